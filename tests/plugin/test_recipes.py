"""Recipes: the QuantConfig record and flat mappings, presets, round trips through dict / YAML / JSON, and
one-line errors naming the bad key and the accepted ones."""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum.adaround.graph_passes.config import ModuleOverride, QuantConfig, override_keys
from optimum.adaround.graph_passes.errors import InvalidOptionError, UnsupportedSchemeError, UserError
from optimum.adaround.graph_passes.scheme import QuantScheme, WeightFormat
from optimum.adaround.recipes import (
    PRESETS,
    config_from_mapping,
    get_preset,
    load_config,
    resolve_config,
    save_config,
)

CUSTOM_FLAT = {
    "scheme": "w3-g64-asym",
    "method": "gptq",
    "method_options": {"percdamp": 0.02, "act_order": True},
    "format": "lowbit",
    "calib_data": "news",
    "calib_samples": 16,
    "seq_len": 128,
    "sequential": False,
    "include": ["layers\\."],
    "exclude": ["lm_head", "embed"],
    "lm_head": "4",
    "embeddings": "none",
    "seed": 3,
    "accuracy_level": 0,
    "workers": 2,
    "overrides": [{"pattern": "mlp\\.down_proj", "scheme": "w8-g128"}],
}
CUSTOM = QuantConfig().with_overrides(**CUSTOM_FLAT)


def test_flat_mapping_sets_every_field():
    c = CUSTOM
    assert (c.scheme.bits, c.scheme.group_size, c.scheme.symmetric) == (3, 64, False)
    assert c.scheme.format is WeightFormat.LOWBIT
    assert c.method.name == "gptq" and c.method.percdamp == 0.02 and c.method.act_order is True
    cal = c.calibration
    assert (cal.calib_data, cal.calib_samples, cal.seq_len, cal.sequential, cal.seed) == (
        "news",
        16,
        128,
        False,
        3,
    )
    sel = c.selection
    assert sel.include == ("layers\\.",) and sel.exclude == ("lm_head", "embed")
    assert (sel.lm_head, sel.embeddings) == ("4", "none")
    assert sel.overrides == (ModuleOverride("mlp\\.down_proj", "w8-g128"),)
    assert (c.output.accuracy_level, c.output.workers) == (0, 2)
    assert config_from_mapping({"version": 1, "name": "custom", **CUSTOM_FLAT}) == CUSTOM
    # recipes of 0.7 wrote lm_head as a switch: true is the run's scheme, false is float
    assert config_from_mapping({"lm_head": True}).selection.lm_head == "scheme"
    assert config_from_mapping({"lm_head": False}).selection.lm_head == "none"


def test_defaults_are_w4_g128_sym_gptq_auto():
    c = QuantConfig()
    assert (
        (c.scheme.bits, c.scheme.group_size) == (4, 128)
        and c.scheme.symmetric
        and c.scheme.format is WeightFormat.AUTO
    )
    assert c.method.name == "gptq" and c.needs_calibration
    # small and fast by default: 8-bit output projection and embeddings, int8-activation kernels
    assert (c.selection.lm_head, c.selection.embeddings, c.output.accuracy_level) == ("8", "8", 4)
    assert c.calib_samples == c.method.default_calib_samples
    assert QuantConfig().with_overrides(method="adaround").calib_samples == 128
    assert QuantConfig().with_overrides(calib_samples=7).calib_samples == 7
    assert resolve_config(None) == c == config_from_mapping({})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_round_trip(name):
    c = get_preset(name)
    assert isinstance(c.scheme, QuantScheme)
    assert QuantConfig.from_dict(c.to_dict()) == c
    label, method = name.rsplit("-", 1)
    assert c == QuantConfig().with_overrides(scheme=label, method=method)
    assert c.scheme.label.startswith(label) and c.method.name == method
    assert resolve_config(name) == c


def test_required_presets_exist():
    assert {"w4-g128-adaround", "w4-g128-gptq", "w3-g128-adaround", "w4-g128-rtn"} <= set(PRESETS)


def test_custom_round_trip_dict_yaml_json(tmp_path):
    assert QuantConfig.from_dict(CUSTOM.to_dict()) == CUSTOM
    assert load_config(save_config(CUSTOM, tmp_path / "r.yaml")) == CUSTOM
    assert load_config(save_config(CUSTOM, tmp_path / "r.json")) == CUSTOM
    record = json.loads((tmp_path / "r.json").read_text())
    assert (record["type"], record["version"]) == ("QuantConfig", 1)
    assert yaml.safe_load((tmp_path / "r.yaml").read_text()) == record
    # the flat form written by hand reads back as the same config
    (tmp_path / "flat.yaml").write_text(yaml.safe_dump({"version": 1, **CUSTOM_FLAT}))
    assert load_config(tmp_path / "flat.yaml") == CUSTOM


def test_a_scheme_label_keeps_the_configs_format():
    base = QuantConfig().with_overrides(format="qdq")
    assert base.with_overrides(scheme="w8-pc").scheme.format is WeightFormat.QDQ
    assert (
        base.with_overrides(scheme=QuantScheme(bits=8, group_size=-1)).scheme.format is not WeightFormat.QDQ
    )


def test_lists_and_tuples_compare_equal():
    a = config_from_mapping({"exclude": ["lm_head"], "include": ["layers"]})
    assert a == QuantConfig().with_overrides(exclude=("lm_head",), include=("layers",))


@pytest.mark.parametrize(
    ("data", "error", "needles"),
    [
        ({"shceme": "w4-g128"}, InvalidOptionError, ["'shceme'", "accepted:", "calib_samples", "scheme"]),
        ({"quantize_lm_head": True}, InvalidOptionError, ["'quantize_lm_head'", "lm_head"]),
        ({"version": 2}, InvalidOptionError, ["version 2"]),
        ({"type": "QuantConfig", "version": 2, "data": {}}, InvalidOptionError, ["version 2"]),
        (
            {"type": "QuantConfig", "version": 1, "data": {"bits": 3}},
            InvalidOptionError,
            ["'bits'", "scheme"],
        ),
        ({"type": "Recipe", "version": 1, "data": {}}, InvalidOptionError, ["QuantConfig", "Recipe"]),
        ({"scheme": "w4-q128"}, UnsupportedSchemeError, ["w4-q128"]),
        ({"scheme": "w9-g128"}, UnsupportedSchemeError, ["bits=9"]),
        ({"bits": 9}, UnsupportedSchemeError, ["bits=9"]),
        ({"group_size": 3}, UnsupportedSchemeError, ["group_size=3"]),
        ({"format": "gguf"}, InvalidOptionError, ["'gguf'", "matmulnbits"]),
        ({"calib_samples": 0}, InvalidOptionError, ["calib_samples"]),
        ({"calib_samples": True}, InvalidOptionError, ["calib_samples"]),
        ({"sequential": "yes"}, InvalidOptionError, ["sequential"]),
        ({"include": "layers"}, InvalidOptionError, ["include", "list"]),
        ({"exclude": ["("]}, InvalidOptionError, ["exclude"]),
        ({"exclude": 3}, InvalidOptionError, ["exclude"]),
        ({"overrides": [{"pattern": "x", "scheme": "w4-zz"}]}, UnsupportedSchemeError, ["w4-zz"]),
        ({"overrides": [{"pattern": "x", "bits": 8}]}, InvalidOptionError, ["'bits'", "pattern"]),
        ({"method": 4}, InvalidOptionError, ["method"]),
        ({"method": "magic"}, InvalidOptionError, ["'magic'", "gptq", "rtn"]),
        ({"method_options": {"damp": 1}}, InvalidOptionError, ["'damp'", "percdamp"]),
        ({"accuracy_level": 5}, InvalidOptionError, ["accuracy_level"]),
        ({"workers": 0}, InvalidOptionError, ["workers"]),
    ],
)
def test_bad_recipes_raise_one_line_user_errors(data, error, needles):
    with pytest.raises(error) as info:
        config_from_mapping(data)
    assert isinstance(info.value, UserError)
    msg = str(info.value)
    assert all(n in msg for n in needles), msg
    assert "\n" not in msg


def test_method_options_must_be_a_mapping():
    with pytest.raises(InvalidOptionError, match="method_options"):
        config_from_mapping({"method_options": [1]})


def test_an_override_needs_a_pattern():
    with pytest.raises(InvalidOptionError, match="pattern"):
        config_from_mapping({"overrides": [{"scheme": "w8-g128"}]})


def test_bad_data_type_names_the_data_types():
    with pytest.raises(InvalidOptionError) as info:
        config_from_mapping({"data_type": "nf5"})
    assert "nf4" in str(info.value) and "codebook" in str(info.value)


def test_unknown_key_in_file_names_file_key_and_accepted_ones(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("version: 1\nmethod: gptq\ngroup: 64\n")
    with pytest.raises(InvalidOptionError, match=r"bad\.yaml.*'group'.*accepted:.*group_size") as info:
        load_config(p)
    assert "\n" not in str(info.value)
    rec = tmp_path / "bad_record.yaml"
    data = QuantConfig().to_dict()
    data["data"]["calibration"]["samples"] = 3
    rec.write_text(yaml.safe_dump(data))
    with pytest.raises(InvalidOptionError, match=r"bad_record\.yaml.*'samples'.*calib_samples"):
        load_config(rec)


def test_invalid_yaml_json_and_non_mapping(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("method: [gptq\n")
    with pytest.raises(InvalidOptionError, match="not valid YAML"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(InvalidOptionError, match="mapping"):
        load_config(p)
    j = tmp_path / "broken.json"
    j.write_text("{")
    with pytest.raises(InvalidOptionError, match="not valid JSON"):
        load_config(j)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == QuantConfig()


def test_resolve_config(tmp_path):
    assert resolve_config(CUSTOM) is CUSTOM
    assert resolve_config("w4-g128-gptq") == get_preset("w4-g128-gptq")
    assert resolve_config({"method": "rtn"}) == QuantConfig().with_overrides(method="rtn")
    assert resolve_config(CUSTOM.to_dict()) == CUSTOM
    path = save_config(CUSTOM, tmp_path / "c.yaml")
    assert resolve_config(str(path)) == CUSTOM and resolve_config(path) == CUSTOM
    with pytest.raises(InvalidOptionError, match="does not exist"):
        resolve_config(tmp_path / "missing.yaml")
    with pytest.raises(InvalidOptionError, match="neither a preset"):
        resolve_config("w4-g128-magic")
    with pytest.raises(InvalidOptionError, match="config=4"):
        resolve_config(4)


def test_with_overrides_rejects_unknown_keys_naming_the_accepted_ones():
    assert QuantConfig().with_overrides(method="rtn").method.name == "rtn"
    assert QuantConfig().with_overrides(bits=3).scheme.bits == 3
    with pytest.raises(InvalidOptionError, match="'group'") as info:
        QuantConfig().with_overrides(group=64)
    assert all(k in str(info.value) for k in override_keys())
    # method_options apply to the method given next to them, on top of that method's defaults
    gptq = QuantConfig().with_overrides(method_options={"percdamp": 0.05})
    assert gptq.method.percdamp == 0.05
    assert gptq.with_overrides(method="gptq").method.percdamp == 0.01
    assert gptq.with_overrides(method_options={"act_order": False}).method.percdamp == 0.05


def test_flat_lists_every_leaf_option_once():
    names = [name for name, _ in QuantConfig().flat()]
    assert len(names) == len(set(names))
    assert set(names) | {"scheme", "method", "method_options"} == set(override_keys())
    assert dict(CUSTOM.flat())["calib_samples"] == 16


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    group=st.sampled_from([-1, 16, 32, 64, 128, 256]),
    sym=st.booleans(),
    method=st.sampled_from(["rtn", "gptq", "adaround", "adaround_ls"]),
    samples=st.integers(1, 4096),
    exclude=st.lists(st.sampled_from(["lm_head", "q_proj", "mlp\\..*", "layers\\.[0-3]\\."]), max_size=3),
    override=st.none() | st.sampled_from(["down_proj", "o_proj"]),
    fmt=st.sampled_from([f.value for f in WeightFormat]),
)
def test_round_trip_property(bits, group, sym, method, samples, exclude, override, fmt):
    g = "pc" if group == -1 else f"g{group}"
    c = QuantConfig().with_overrides(
        scheme=f"w{bits}-{g}-{'sym' if sym else 'asym'}",
        method=method,
        format=fmt,
        calib_samples=samples,
        exclude=tuple(exclude),
        overrides=() if override is None else (ModuleOverride(override, "w8-g128"),),
    )
    assert QuantConfig.from_dict(c.to_dict()) == c
    assert QuantConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert config_from_mapping(yaml.safe_load(yaml.safe_dump(c.to_dict()))) == c


@pytest.mark.parametrize("value", [0.5, True, "64", 2e6])
def test_sink_weight_must_be_a_number_in_range(value):
    with pytest.raises(InvalidOptionError, match="sink_weight="):
        QuantConfig().with_overrides(sink_weight=value)
    assert QuantConfig().with_overrides(sink_weight=16).calibration.sink_weight == 16.0
