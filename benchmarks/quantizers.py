"""The quantization jobs of the side-by-side benchmark (``quality.py``): onnxruntime's weight-only quantizer
and ours, each writing one output folder. They are module-level functions because they run in a spawned
process (``measure.run_function``), which imports them by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

# Side files of an export folder that every quantized folder needs for evaluation (tokenizer, config).
_SIDE_SUFFIXES = (".json", ".jinja", ".txt", ".model")


def copy_side_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and f.suffix in _SIDE_SUFFIXES and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)


class _Reader:
    """onnxruntime CalibrationDataReader over fixed token ids (built from the model's own inputs)."""

    def __init__(self, model_file: Path, token_ids: np.ndarray) -> None:
        from optimum.adaround.graph_passes.calibration.feeds import feed_specs, make_feeds
        from optimum.adaround.graph_passes.model_io import load_model

        specs = feed_specs(list(load_model(model_file).model.graph.inputs))
        self._feeds = [make_feeds(specs, token_ids[i : i + 1]) for i in range(token_ids.shape[0])]
        self._it = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)

    def __deepcopy__(self, memo: dict[int, Any]) -> _Reader:  # the quantizer deep-copies its reader
        new = object.__new__(_Reader)
        new._feeds = self._feeds
        new._it = iter(self._feeds)
        return new

    def __iter__(self) -> Any:
        return iter(self._feeds)


def _ort_config(
    algo: str, bits: int, group: int, model_file: Path, token_ids_file: str | None, level: Any
) -> Any:
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    if algo == "default":
        return mq.DefaultWeightOnlyQuantConfig(
            block_size=group, is_symmetric=True, bits=bits, accuracy_level=level
        )
    if algo == "rtn":
        return mq.RTNWeightOnlyQuantConfig()
    if algo == "gptq":
        if token_ids_file is None:
            raise ValueError("onnxruntime gptq needs calibration token ids")
        return mq.GPTQWeightOnlyQuantConfig(
            calibration_data_reader=_Reader(model_file, np.load(token_ids_file))
        )
    if algo == "hqq":
        return mq.HQQWeightOnlyQuantConfig(block_size=group, bits=bits)
    if algo == "kquant":
        return mq.KQuantWeightOnlyQuantConfig()
    raise ValueError(f"unknown onnxruntime algorithm {algo!r}")


def ort_job(
    src: str,
    out: str,
    algo: str,
    bits: int,
    group: int,
    token_ids_file: str | None,
    accuracy_level: int | None = None,
) -> dict[str, Any]:
    """onnxruntime's MatMulNBitsQuantizer with one of its algorithm configs."""
    import logging

    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    logging.getLogger().setLevel(logging.WARNING)  # the quantizer switches the root logger to INFO
    src_dir, out_dir = Path(src), Path(out)
    model_file = src_dir / "model.onnx"
    cfg = _ort_config(algo, bits, group, model_file, token_ids_file, accuracy_level)
    quantizer = mq.MatMulNBitsQuantizer(
        onnx.load(str(model_file)),
        accuracy_level=accuracy_level,
        algo_config=cfg,
        bits=bits,
        block_size=group,
        is_symmetric=True,
    )
    quantizer.process()
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir.parent))
    quantizer.model.save_model_to_file(str(tmp / "model.onnx"), use_external_data_format=False)
    copy_side_files(src_dir, tmp)
    os.rename(tmp, out_dir)
    return {}


def ours_job(
    src: str,
    out: str,
    method: str,
    scheme: str,
    fmt: str,
    token_ids_file: str | None,
    method_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from optimum.adaround.api import quantize

    options: dict[str, Any] = {"method_options": method_options} if method_options else {}
    if token_ids_file:
        options["calib_data"] = np.load(token_ids_file)
    quantize(src, out, scheme=scheme, method=method, format=fmt, progress=False, **options)
    cfg = Path(out) / "quantization_config.json"
    if not cfg.is_file():
        return {}
    record = json.loads(cfg.read_text())
    return {"timings": record.get("timings"), "site_counts": site_counts(record.get("sites", []))}


def site_counts(sites: list[dict[str, Any]]) -> dict[str, int]:
    """Per-site proxy-loss ordering from a quantization_config.json ``sites`` list.

    Each comparison is under the *same* H (the site's own calibration statistics in that run):
    ``below_rtn`` counts sites whose H-weighted loss is below min-max RTN's, ``below_init`` sites where a
    refining method (adaround, adaround_ls) ended below its GPTQ start; ``*_of`` is how many sites carry
    the metric."""
    out = {"below_rtn": 0, "below_rtn_of": 0, "below_init": 0, "below_init_of": 0}
    for site in sites:
        m = site.get("metrics", {})
        if "proxy_loss_rtn" in m:
            out["below_rtn_of"] += 1
            out["below_rtn"] += int(m["proxy_loss"] < m["proxy_loss_rtn"])
        if "proxy_loss_init" in m:
            out["below_init_of"] += 1
            out["below_init"] += int(m["proxy_loss"] < m["proxy_loss_init"])
    return out


def weights_digest(model_dir: Path) -> str:
    """SHA-256 over the quantized weight tensors (codes, scales, zero points) in graph order."""
    from optimum.adaround.evaluation import quantized_sites
    from optimum.adaround.graph_passes.model_io import load_model

    h = hashlib.sha256()
    sites, _ = quantized_sites(load_model(model_dir).model)
    for s in sites:
        for role in sorted(s.tensors):
            h.update(role.encode())
            h.update(np.ascontiguousarray(s.tensors[role].numpy()).tobytes())
    return h.hexdigest()
