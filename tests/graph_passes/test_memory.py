"""The rounding's memory budget: the plan per block, and the same bytes whatever the budget."""

from __future__ import annotations

import numpy as np
import pytest

from optimum.adaround.graph_passes import parallel, pipeline
from optimum.adaround.graph_passes.config import QuantConfig
from optimum.adaround.graph_passes.errors import UserError
from optimum.adaround.graph_passes.memory import GB, plan_rounding, site_need, tree_anon_bytes
from optimum.adaround.graph_passes.model_io import load_model
from optimum.adaround.graph_passes.pipeline import prepare_sites, quantize_model
from optimum.adaround.graph_passes.records import WeightSite
from optimum.adaround.graph_passes.rounding import calibrated
from optimum.adaround.graph_passes.rounding.base import method_config


def _site(name: str, n: int, k: int) -> WeightSite:
    return WeightSite(name, name, "MatMul", name + ".w", k=k, n=n, transposed=False, activation="x")


def test_the_plan_shares_what_is_left_among_the_sites_rounded_at_once():
    gptq = method_config("gptq")
    sites = [_site("a", 4096, 1024), _site("b", 1024, 1024)]
    need = site_need(gptq, sites[0])
    assert plan_rounding(None, 0, sites, gptq, 4).concurrent == 2  # no budget: every site at once
    assert plan_rounding(None, 0, sites, gptq, 4).memory is None
    roomy = plan_rounding(10 * GB, GB, sites, gptq, 2)
    assert roomy.concurrent == 2 and roomy.memory == (9 * GB) // 2
    tight = plan_rounding(GB + need + need // 2, GB, sites, gptq, 2)  # room for one site only
    assert tight.concurrent == 1
    alone = plan_rounding(GB + need, GB, sites, gptq, 1)
    assert alone.concurrent == 1 and alone.memory == need
    with pytest.raises(UserError, match=r"max_memory=1\.00 GB is too small: the run holds 0\.99 GB and a "):
        plan_rounding(GB, int(0.99 * GB), sites, gptq, 2)


def test_data_free_methods_are_not_planned():
    plan = plan_rounding(GB, 2 * GB, [_site("a", 64, 64)], method_config("rtn"), 3)
    assert plan.concurrent == 1 and plan.memory is None


def test_tree_memory_counts_this_process():
    """64 MiB of private anonymous pages, touched one 4 KiB page at a time: a kernel that counts a task's
    pages per thread syncs the count every 64 faults, and 2 MiB pages would take only 32."""
    import mmap

    before = tree_anon_bytes()
    block = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        block.madvise(mmap.MADV_NOHUGEPAGE)
    pages = np.frombuffer(block, np.uint8)
    pages[:: mmap.PAGESIZE] = 1
    assert tree_anon_bytes() - before >= 60 << 20
    del pages
    block.close()


def _arrays(model) -> dict[str, np.ndarray]:
    return {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_small_budget_rounds_in_chunks_with_the_same_bytes(tiny_hf_onnx, monkeypatch, workers):
    """The run holds all but room for one 64-row chunk of the widest site: every site is rounded within
    a bound (and, with workers, handed over through memory-mapped files); same bytes as without one.
    (Chunking proper is tested per method in rounding/test_calibrated.py.)"""
    ids = np.random.default_rng(0).integers(0, 300, (4, 16))
    base = QuantConfig().with_overrides(scheme="w4-g32", method="gptq", workers=workers)
    chunks: list[tuple[int, int | None]] = []
    real_slices = calibrated.row_slices

    def spy(n: int, rows: int | None):
        chunks.append((n, rows))
        return real_slices(n, rows)

    runs = []
    for budget in (None, 1.0):
        model = load_model(tiny_hf_onnx("llama")).model
        report = prepare_sites(model)
        if budget is not None:
            widest = max(report.sites, key=lambda s: site_need(base.method, s))
            free = site_need(base.method, widest) + 1000
            held = int(budget * GB) - free
            monkeypatch.setattr(pipeline, "tree_anon_bytes", lambda held=held: held)
            monkeypatch.setattr(parallel, "SPILL_BYTES", 0)
            monkeypatch.setattr(calibrated, "row_slices", spy)
        config = base.with_overrides(max_memory=budget)
        with quantize_model(model, config, sites=report, token_ids=ids, progress=False):
            runs.append(_arrays(model))
    if workers == 1:  # the widest site got exactly one smallest chunk; every method call got a bound
        assert chunks and all(rows is not None for _, rows in chunks)
        assert (64, 64) in chunks
    whole, chunked = runs
    assert whole.keys() == chunked.keys()
    for name in whole:
        np.testing.assert_array_equal(whole[name], chunked[name], err_msg=name)


def test_a_budget_below_one_site_is_a_one_line_error(tiny_hf_onnx, monkeypatch, tmp_path):
    from optimum.adaround import quantize

    monkeypatch.setattr(pipeline, "tree_anon_bytes", lambda: GB)
    out = tmp_path / "q"
    with pytest.raises(UserError, match=r"^max_memory=0\.50 GB is too small: the run holds 1\.00 GB") as e:
        quantize(
            tiny_hf_onnx("llama"),
            out,
            method="gptq",
            max_memory=0.5,
            calib_samples=2,
            seq_len=16,
            progress=False,
        )
    assert "\n" not in str(e.value)
    assert not out.exists()
