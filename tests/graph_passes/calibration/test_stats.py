"""Streaming statistics: wide sums kept in memory-mapped files equal the in-memory ones."""

from __future__ import annotations

import numpy as np

from optimum.adaround.graph_passes.calibration import stats as stats_mod
from optimum.adaround.graph_passes.calibration.stats import HessianAccumulator
from optimum.adaround.graph_passes.parallel import Mapped, mapped
from optimum.adaround.graph_passes.records import WeightSite


def _sites(k: int) -> list[WeightSite]:
    return [
        WeightSite(f"l0.{p}", p, "MatMul", p + ".w", k=k, n=8, transposed=False, activation="x") for p in "qk"
    ]


def test_wide_sums_live_in_files_and_equal_the_in_memory_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(stats_mod, "MAPPED_BYTES", 8 * 48 * 48)  # K = 48 counts as wide here
    xs = [np.random.default_rng(i).standard_normal((2, 5, 48)).astype(np.float32) for i in range(3)]
    in_memory, in_files = HessianAccumulator(_sites(48)), HessianAccumulator(_sites(48), folder=tmp_path)
    for x in xs:
        in_memory.add("x", x)
        in_files.add("x", x)
    h = in_files.hessians["x"]
    assert isinstance(h, np.memmap) and [p.name for p in tmp_path.iterdir()] == [
        h.filename.rsplit("/", 1)[-1]
    ]
    np.testing.assert_array_equal(h, in_memory.hessians["x"])
    handed = mapped(h, tmp_path / "unused.npy")  # the file itself goes to the workers: no second copy
    assert isinstance(handed, Mapped) and handed.path == h.filename
    assert not (tmp_path / "unused.npy").exists()
    np.testing.assert_array_equal(handed.open(), in_memory.hessians["x"])


def test_narrow_sums_and_runs_without_a_folder_stay_in_memory(tmp_path):
    acc = HessianAccumulator(_sites(16), folder=tmp_path)
    assert not isinstance(acc.hessians["x"], np.memmap) and not list(tmp_path.iterdir())
    small = np.ones((4, 4))
    assert mapped(small, tmp_path / "s.npy") is small


def test_sums_added_by_row_blocks_equal_the_whole_product(monkeypatch):
    """A batch's X^T X goes into the sum a few rows at a time (no K x K temporary); same sums."""
    monkeypatch.setattr(stats_mod, "PRODUCT_BYTES", 8 * 48 * 5)  # 5 rows of a K = 48 float64 sum
    xs = [np.random.default_rng(i).standard_normal((2, 5, 48)).astype(np.float32) for i in range(3)]
    acc = HessianAccumulator(_sites(48))
    for x in xs:
        acc.add("x", x)
    flat = np.concatenate([x.reshape(-1, 48) for x in xs]).astype(np.float64)
    np.testing.assert_allclose(acc.hessians["x"], flat.T @ flat, rtol=1e-12, atol=1e-12)
    assert acc.stats["x"].n_tokens == 30
