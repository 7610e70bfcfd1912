"""Block tuning lowers a block's output error, and the codes it returns compute the error it reports."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from optimum.adaround.graph_passes.records import QuantizedWeight, WeightSite
from optimum.adaround.graph_passes.rounding.rtn import RTN, RTNConfig
from optimum.adaround.graph_passes.scheme import DataType, QuantScheme, WeightFormat
from optimum.adaround.graph_passes.tune.block import (
    NothingToTuneError,
    TuneSettings,
    relative_error,
    tune_block,
)

D, H, T = 32, 64, 16


def _block(rng: np.random.Generator) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """x -> MatMul(up) -> Relu -> MatMul(down) -> + x: a residual MLP with random weights."""
    weights = {
        "up": rng.standard_normal((D, H)) / np.sqrt(D),
        "down": rng.standard_normal((H, D)) / np.sqrt(H),
    }
    weights = {k: v.astype(np.float32) for k, v in weights.items()}
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "up"], ["u"], name="/mlp/up/MatMul"),
            helper.make_node("Relu", ["u"], ["r"]),
            helper.make_node("MatMul", ["r", "down"], ["d"], name="/mlp/down/MatMul"),
            helper.make_node("Add", ["x", "d"], ["y"]),
        ],
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", T, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", T, D])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return ir.from_proto(helper.make_model(graph)), weights


def _site(name: str, k: int, n: int) -> WeightSite:
    return WeightSite(name=f"mlp.{name}", node_name=f"/mlp/{name}/MatMul", op_type="MatMul", weight_name=name,
                      k=k, n=n, transposed=False, activation="x", layer=0, kind="linear")  # fmt: skip


def _forward(x: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    return x + np.maximum(x @ up, 0) @ down


def _token_error(xs: list[np.ndarray], targets: list[list[np.ndarray]], w: dict[str, np.ndarray]) -> float:
    """Mean over every position of |out - target|^2 / |target|^2 (what the tuner reports)."""
    errs = [np.sum((_forward(x, w["up"], w["down"]) - t[0]) ** 2, -1) / np.sum(t[0] ** 2, -1)
            for x, t in zip(xs, targets, strict=True)]  # fmt: skip
    return float(np.mean(errs))


@pytest.mark.parametrize("symmetric", [True, False])
def test_tuning_lowers_the_block_error_it_reports(symmetric):
    rng = np.random.default_rng(0)
    model, w = _block(rng)
    scheme = QuantScheme(bits=2, group_size=16, symmetric=symmetric)
    sites = [_site("up", D, H), _site("down", H, D)]
    qws = {s.name: RTN(RTNConfig()).quantize(w[s.weight_name].T.copy(), scheme) for s in sites}
    xs = [rng.standard_normal((2, T, D)).astype(np.float32) for _ in range(4)]
    targets = [[_forward(x, w["up"], w["down"])] for x in xs]

    tuned, report = tune_block(
        model.graph, sites, qws, [{"x": x} for x in xs], targets, TuneSettings(steps=60, first_weight=1.0)
    )

    for qw in tuned.values():
        qw.check()
    # micro batches of 2 sequences: the fourth is held out, the first three are fitted
    new = {name: tuned[f"mlp.{name}"].dequantize().T for name in ("up", "down")}
    old = {name: qws[f"mlp.{name}"].dequantize().T for name in ("up", "down")}
    assert _token_error(xs[3:], targets[3:], new) == pytest.approx(report["error_after"], rel=1e-3)
    assert _token_error(xs[3:], targets[3:], old) == pytest.approx(report["error_before"], rel=1e-3)
    assert _token_error(xs[:3], targets[:3], new) == pytest.approx(report["train_error_after"], rel=1e-3)
    assert report["train_error_after"] < 0.8 * report["train_error_before"]
    assert report["error_after"] < report["error_before"]


def test_codes_are_kept_when_tuning_does_not_help():
    rng = np.random.default_rng(1)
    model, w = _block(rng)
    scheme = QuantScheme(bits=8, group_size=16)
    sites = [_site("up", D, H), _site("down", H, D)]
    qws = {s.name: RTN(RTNConfig()).quantize(w[s.weight_name].T.copy(), scheme) for s in sites}
    x = rng.standard_normal((2, T, D)).astype(np.float32)
    tuned, report = tune_block(model.graph, sites, qws, [{"x": x}], [[_forward(x, w["up"], w["down"])]],
                               TuneSettings(steps=3, lr=1.0))  # fmt: skip
    # steps of a whole grid step at 8 bits throw the codes far off: worse, so the method's codes stay
    assert report["error_after"] > report["error_before"]
    assert tuned is qws


def test_codebook_weights_stay_and_the_others_are_tuned():
    rng = np.random.default_rng(2)
    model, w = _block(rng)
    sites = [_site("up", D, H), _site("down", H, D)]
    nf4 = QuantScheme(bits=4, group_size=16, data_type=DataType.NF4, format=WeightFormat.LOWBIT)
    book = np.linspace(-1, 1, 16).astype(np.float32)
    up = w["up"].T
    scales = np.abs(up).reshape(H, D // 16, 16).max(-1).astype(np.float32)
    codes = np.abs(up[..., None] / np.repeat(scales, 16, 1)[..., None] - book).argmin(-1).astype(np.uint8)
    qws = {"mlp.up": QuantizedWeight(codes, scales, None, nf4, book),
           "mlp.down": RTN(RTNConfig()).quantize(w["down"].T.copy(), QuantScheme(bits=2, group_size=16))}  # fmt: skip
    xs = [rng.standard_normal((2, T, D)).astype(np.float32) for _ in range(4)]
    targets = [[_forward(x, w["up"], w["down"])] for x in xs]
    tuned, report = tune_block(
        model.graph, sites, qws, [{"x": x} for x in xs], targets, TuneSettings(steps=40, first_weight=1.0)
    )
    assert tuned["mlp.up"] is qws["mlp.up"]
    assert not np.array_equal(tuned["mlp.down"].codes, qws["mlp.down"].codes)
    # the error before is that of the codebook weight as rounded, not of the float one
    deq = {"up": qws["mlp.up"].dequantize().T, "down": qws["mlp.down"].dequantize().T}
    assert _token_error(xs[3:], targets[3:], deq) == pytest.approx(report["error_before"], rel=1e-3)
    with pytest.raises(NothingToTuneError, match="codebook"):
        tune_block(
            model.graph, sites[:1], {"mlp.up": qws["mlp.up"]}, [{"x": xs[0]}], targets[:1], TuneSettings()
        )


def test_the_first_position_counts_as_often_as_asked():
    target = torch.ones(2, 4, 3)
    out = target.clone()
    out[:, 0] += 1.0  # relative error 1 at the first position, 0 elsewhere
    assert float(relative_error(out, target, per_token=True, first_weight=1.0)) == pytest.approx(1 / 4)
    assert float(relative_error(out, target, per_token=True, first_weight=5.0)) == pytest.approx(5 / 8)
    assert float(relative_error(out, target, per_token=False)) == pytest.approx(6 / 24)
