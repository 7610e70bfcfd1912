import pytest

from optimum.adaround.graph_passes.errors import UnsupportedSchemeError
from optimum.adaround.graph_passes.scheme import PER_CHANNEL, DataType, QuantScheme, WeightFormat


@pytest.mark.parametrize(
    "label, bits, group, sym",
    [("w4-g128", 4, 128, True), ("w3-g64-asym", 3, 64, False), ("w8-pc-sym", 8, PER_CHANNEL, True)],
)
def test_parse(label, bits, group, sym):
    s = QuantScheme.parse(label)
    assert (s.bits, s.group_size, s.symmetric) == (bits, group, sym)


@pytest.mark.parametrize("scheme", [QuantScheme(), QuantScheme(3, 64, False, "lowbit"), QuantScheme(4, -1)])
def test_dict_round_trip(scheme):
    d = scheme.to_dict()
    assert d["type"] == "QuantScheme" and d["version"] == QuantScheme.VERSION
    assert QuantScheme.from_dict(d) == scheme


def test_from_dict_rejects_unknown_keys_and_versions():
    d = QuantScheme().to_dict()
    d["data"]["bogus"] = 1
    with pytest.raises(UnsupportedSchemeError, match="bogus"):
        QuantScheme.from_dict(d)
    d = QuantScheme().to_dict()
    d["version"] = 99
    with pytest.raises(UnsupportedSchemeError, match="version 99"):
        QuantScheme.from_dict(d)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 1}, "bits=1"),
        ({"bits": 9}, "bits=9"),
        ({"group_size": 48}, "group_size=48"),
        ({"group_size": 8}, "group_size=8"),
        ({"scale_dtype": "bfloat16"}, "scale_dtype"),
        ({"bits": 3, "data_type": "nf4", "format": "lowbit"}, "needs bits=4"),
        ({"data_type": "nf4"}, "format=lowbit"),
    ],
)
def test_validation_names_the_problem(kwargs, match):
    with pytest.raises(UnsupportedSchemeError, match=match):
        QuantScheme(**kwargs)


def test_derived_quantities():
    s = QuantScheme(bits=3, group_size=128)
    assert (s.qmin, s.qmax, s.implied_zero_point) == (0, 7, 4)
    assert s.block_size(576) == 128 and s.n_blocks(576) == 5
    pc = QuantScheme(bits=4, group_size=PER_CHANNEL)
    assert pc.block_size(576) == 576 and pc.n_blocks(576) == 1
    assert QuantScheme(format="qdq").format is WeightFormat.QDQ
    assert QuantScheme(format="lowbit", data_type="fp4").data_type is DataType.FP4
    assert QuantScheme(bits=3, group_size=64, symmetric=False).label == "w3-g64-asym"
