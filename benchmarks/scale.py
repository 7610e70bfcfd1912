"""Scale: the cost of ``quantize`` at the real widths of billion-parameter decoders, a few blocks deep.

Decoder-only models with the dimensions of Llama-3-8B, of Llama-2-70B (its widest sites) and of
Gemma-3-270M (its 262144 x 640 tied output projection) are built with transformers from a config, their
weights random (seeded normal, std 0.02, made directly in the target dtype: no default init pass), a few
decoder blocks deep (``--blocks``). Each is exported by Optimum (task text-generation-with-past) in fp32 or
fp16, then quantized with the public API in a fresh process per configuration. Each row records:

- the phases' wall times, from the run's own record (``quantization_config.json``): calibration (the
  calibration engine's parts), rounding (its ``on_block`` callbacks, or the sites' seconds for data-free
  methods), packing (pack + spill of each site, timed in the run's process), rewrite (graph rewrite and
  8-bit embedding), saving; per decoder block from the parts and the site names;
- the peak of the summed ``RssAnon`` of the quantizing process and its rounding workers (sampled every
  50 ms; memory-mapped weight pages are file-backed and not counted) and, for reference, of their summed PSS;
- an estimate at full depth: the measured run plus (depth - blocks) times the mean decoder block (block 0,
  which also waits for the workers to start, excluded when there are more), saving scaled by the bytes
  written. The peak memory is expected to stay that of the measured run (sites are rounded block by
  block, the weights memory-mapped), which ``--blocks`` lets one check.

Export: the torch model is handed to Optimum's ``onnx_export_from_model`` (what ``main_export`` calls once it
has loaded a checkpoint), which exports an fp16 model on the CPU as it is; this skips writing and re-reading
a multi-GB checkpoint. Optimum gathers the external data of a model over 2 GB by loading the whole ONNX
model and saving it again: a second copy of the weights in memory. Here the parameters are drawn into
memory-mapped files (file-backed pages, not RssAnon) and onnx-ir's streamed save gathers the external data
once the torch model is freed, so the export's RssAnon is what the exporter itself allocates. Llama-3-8B
fp16, 2 blocks (3.0 GB of weights): Optimum's path alone peaked at 7.4 GB RssAnon, this one at 3.7 GB.

Calibration is deliberately small (random token ids, 4 sequences of 64 by default): these are costs of the
pipeline at these widths, not quality figures.

    python benchmarks/scale.py --quick                                   # tiny dims: checks the script
    python benchmarks/scale.py --models llama3-8b --dtype fp32 fp16 --methods rtn gptq
    python benchmarks/scale.py --models llama3-8b --methods adaround --budgets 4 8

Writes ``benchmarks/results/scale.json`` and ``scale.md`` (rows of the configurations run replace their
earlier rows; a ``## Reading`` section of ``scale.md`` is kept). The exports live in ``--workdir`` and are
deleted after their runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import commit, cpu_model, now, run_function  # a sibling module (benchmarks/ is no package)

RESULTS = Path(__file__).resolve().parent / "results"
TASK = "text-generation-with-past"
GB = 1e9
WORKDIR = Path.home() / ".cache" / "optimum-adaround" / "bench-scale"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A decoder's real dimensions (transformers config keys, depth apart), its full depth and the value
    its norm weights start from (Gemma scales by ``1 + w``)."""

    model_type: str
    dims: dict[str, Any]
    full_blocks: int
    quick: dict[str, Any]
    note: str
    norm_init: float = 1.0


_QUICK = {"vocab_size": 2048, "hidden_size": 128, "intermediate_size": 384, "num_attention_heads": 4}

MODELS = {
    "llama3-8b": ModelSpec(
        "llama",
        {
            "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
            "rope_theta": 500000.0, "tie_word_embeddings": False,
        },
        32, {**_QUICK, "num_key_value_heads": 2}, "Llama-3-8B dims, output projection 128256 x 4096",
    ),
    "llama2-70b": ModelSpec(
        "llama",
        {
            "vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672,
            "num_attention_heads": 64, "num_key_value_heads": 8, "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
        },
        80, {**_QUICK, "num_key_value_heads": 2}, "Llama-2-70B dims, sites up to 28672 x 8192",
    ),
    "gemma3-270m": ModelSpec(
        "gemma3_text",
        {
            "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048, "num_attention_heads": 4,
            "num_key_value_heads": 1, "head_dim": 256, "max_position_embeddings": 32768,
            "query_pre_attn_scalar": 256, "sliding_window": 512, "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0, "tie_word_embeddings": True,
        },
        18, {**_QUICK, "num_key_value_heads": 1, "head_dim": 32},
        "Gemma-3-270M dims, tied output projection 262144 x 640", norm_init=0.0,
    ),
}  # fmt: skip


# -- build and export (in a process of its own) --------------------------------------------------------------
def build_model(
    spec: ModelSpec, dims: dict[str, Any], dtype: str, blocks: int, backing: Path | None = None, seed: int = 0
) -> Any:
    """The transformers model of ``spec`` at ``dims``, ``blocks`` deep, its parameters random in ``dtype``.

    The module tree is made without parameters (buffers such as the rotary frequencies are real) and each
    parameter is then drawn once, in ``dtype``: no default init pass. With ``backing`` (a folder), each
    parameter lives in a memory-mapped file there (unlinked at once: its pages are file-backed, so the
    export's RssAnon is what the exporter itself allocates). Tied weights stay tied."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    config = AutoConfig.for_model(spec.model_type, num_hidden_layers=blocks, **dims)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    gen = torch.Generator().manual_seed(seed)
    made: dict[int, torch.nn.Parameter] = {}  # a tied parameter is one object on several modules
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in made:
                value = _tensor(param.shape, torch_dtype, backing, len(made))
                if value.ndim >= 2:
                    value.normal_(0.0, 0.02, generator=gen)
                else:
                    value.fill_(spec.norm_init)
                made[id(param)] = torch.nn.Parameter(value, requires_grad=False)
            module._parameters[name] = made[id(param)]
    return model.eval()


def _tensor(shape: Any, dtype: Any, backing: Path | None, index: int) -> Any:
    """An uninitialised tensor: in memory, or mapped from a fresh file of ``backing`` (then unlinked)."""
    import torch

    if backing is None:
        return torch.empty(shape, dtype=dtype)
    file = backing / f"{index:05d}.bin"
    value = torch.from_file(str(file), shared=True, size=math.prod(shape), dtype=dtype).view(shape)
    file.unlink()  # the mapping keeps the pages; nothing is left behind, whatever happens next
    return value


def export_job(name: str, dtype: str, blocks: int, quick: bool, dest: str) -> dict[str, Any]:
    """Build ``name`` and export it with Optimum into ``dest`` (``model.onnx`` + ``model.onnx_data``)."""
    import gc
    from unittest import mock

    import onnx_ir as ir
    from optimum.exporters.onnx import convert, onnx_export_from_model

    spec, folder = MODELS[name], Path(dest)
    t0 = time.perf_counter()
    (folder / "weights").mkdir(parents=True, exist_ok=True)
    model = build_model(spec, spec.quick if quick else spec.dims, dtype, blocks, backing=folder / "weights")
    n_params = sum(p.numel() for p in model.parameters())
    t1 = time.perf_counter()
    raw = folder / "torch-export"
    # Optimum's own gathering of the external data reloads the whole model (see the module docstring)
    with mock.patch.object(convert, "check_model_uses_external_data", return_value=False):
        onnx_export_from_model(model, raw, task=TASK, do_validation=False)
    del model
    gc.collect()
    t2 = time.perf_counter()
    ir.save(ir.load(raw / "model.onnx"), folder / "model.onnx", external_data="model.onnx_data")
    for side in raw.glob("*.json"):
        shutil.copy2(side, folder / side.name)
    shutil.rmtree(raw)
    (folder / "weights").rmdir()
    t3 = time.perf_counter()
    return {
        "n_params": n_params,
        "onnx_bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
        "build_s": t1 - t0,
        "export_s": t2 - t1,
        "gather_s": t3 - t2,
    }


# -- one quantization run (in a process of its own) ----------------------------------------------------------
def _instrument(marks: dict[str, dict[str, float]]) -> None:
    """Record per site, in this process: the seconds reading its weight (a float32 ``[N, K]`` copy out of
    the mmap), the seconds of its pack + spill + record step and when that ended (``time.monotonic``).
    Instrumentation only, the output is unchanged; hooks a newer pipeline lacks give no figures."""
    from optimum.adaround.graph_passes import pipeline

    read = getattr(pipeline, "read_weight", None)
    quantizer = getattr(pipeline, "_SiteQuantizer", None)
    record = getattr(quantizer, "_record", None)
    if read is not None:

        def timed_read(model: Any, site: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.monotonic()
            out = read(model, site, *args, **kwargs)
            marks.setdefault(site.name, {})["read_s"] = time.monotonic() - t0
            return out

        pipeline.read_weight = timed_read
    if record is not None:

        def timed_record(self: Any, site: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.monotonic()
            out = record(self, site, *args, **kwargs)
            t1 = time.monotonic()
            marks.setdefault(site.name, {}).update(pack_s=t1 - t0, done_at=t1)
            return out

        quantizer._record = timed_record


def quantize_job(src: str, out: str, vocab: int, run: dict[str, Any]) -> dict[str, Any]:
    """Quantize ``src`` into ``out`` with the public API under ``run``'s options; returns the figures."""
    import numpy as np

    from optimum.adaround import quantize

    marks: dict[str, dict[str, float]] = {}
    _instrument(marks)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(run["calib_samples"], run["seq_len"]), dtype=np.int64)
    options = {
        "method": run["method"], "scheme": run["scheme"], "lm_head": run["lm_head"],
        "workers": run["workers"], "calib_data": ids, "progress": False,
    }  # fmt: skip
    if run["max_memory"] is not None:
        options["max_memory"] = run["max_memory"]
    if run["method_options"]:
        options["method_options"] = run["method_options"]
    t0 = time.monotonic()
    quantize(src, out, **options)
    t1 = time.monotonic()
    record = json.loads((Path(out) / "quantization_config.json").read_text())
    return _summary(record, marks, t0, t1)


def _summary(
    record: dict[str, Any], marks: dict[str, dict[str, float]], t0: float, t1: float
) -> dict[str, Any]:
    """What the parent keeps of a run's record: timings, sites (with packing), parts, bytes."""
    sites = [
        {
            "name": s["name"], "kind": s["kind"], "k": s["k"], "n": s["n"], "seconds": s["seconds"],
            "read_s": marks.get(s["name"], {}).get("read_s"), "pack_s": marks.get(s["name"], {}).get("pack_s"),
            "done_at": marks.get(s["name"], {}).get("done_at"), "packed_bytes": s["packed_bytes"],
            "scheme": s["scheme"],
        }
        for s in record["sites"]
    ]  # fmt: skip
    report = record.get("calibration_report") or {}
    return {
        "started_at": t0,
        "ended_at": t1,
        "timings": record["timings"],
        "sites": sites,
        "parts": report.get("parts", []),
        "calibration_s": report.get("seconds"),
        "calibration_cpu_s": report.get("cpu_seconds"),
        "embeddings": [
            {k: e[k] for k in ("table", "shared_with", "bits", "float_bytes", "packed_bytes")}
            for e in record.get("embeddings", [])
        ],
        "float_bytes": record["float_bytes"],
        "quantized_bytes": record["quantized_bytes"],
        "output": record["config"]["data"]["output"],
    }


# -- figures from a run's summary -------------------------------------------------------------------------
def block_of(name: str) -> int | None:
    """The decoder-block index in a site name (``model.layers.3.mlp.up_proj`` -> 3)."""
    m = re.search(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _sum(sites: list[dict[str, Any]], key: str) -> float:
    return sum(s[key] or 0.0 for s in sites)


def per_block(info: dict[str, Any]) -> list[dict[str, Any]]:
    """Calibration, weight reading, rounding and packing seconds of each decoder block (wall time)."""
    by_block: dict[int, list[dict[str, Any]]] = {}
    for s in info["sites"]:
        b = block_of(s["name"])
        if b is not None:
            by_block.setdefault(b, []).append(s)
    parts = {p["label"]: p for p in info["parts"]}
    rows = []
    for b, sites in sorted(by_block.items()):
        read, pack = _sum(sites, "read_s"), _sum(sites, "pack_s")
        part = parts.get(f"block {b}")
        if part is not None:  # reading, rounding and packing run inside the engine's callback
            calib = part["forward_s"] + part["stats_s"] + part["requant_s"]
            rounding = part["callback_s"] - read - pack
        else:  # data-free: the sites are read and rounded one after the other in this process
            calib, rounding = 0.0, sum(s["seconds"] for s in sites) - pack
        rows.append(
            {
                "block": b,
                "sites": len(sites),
                "calibration_s": calib,
                "read_s": read,
                "rounding_s": rounding,
                "packing_s": pack,
                "total_s": calib + read + rounding + pack,
                "packed_bytes": sum(s["packed_bytes"] for s in sites),
            }
        )
    return rows


def phases(info: dict[str, Any]) -> dict[str, float]:
    """The run's wall time split into phases (seconds)."""
    t = info["timings"]
    read, pack = _sum(info["sites"], "read_s"), _sum(info["sites"], "pack_s")
    if info["parts"]:
        callbacks = sum(p["callback_s"] for p in info["parts"])
        calib, rounding = info["calibration_s"] - callbacks, callbacks - read - pack
    else:
        calib, rounding = 0.0, t["quantize"] - read - pack
    quantize_wall = info["ended_at"] - info["started_at"]
    return {
        "calibration_s": calib,
        "read_s": read,
        "rounding_s": rounding,
        "packing_s": pack,
        "rewrite_s": t["rewrite"],
        "save_s": t["total_with_save"] - t["total"],
        "load_other_s": quantize_wall - t["total_with_save"],
        "quantize_call_s": quantize_wall,
    }


def head_figures(info: dict[str, Any]) -> dict[str, Any] | None:
    """The output projection's figures: its part's calibration, weight reading, rounding, packing."""
    head = next((s for s in info["sites"] if s["kind"] == "lm_head"), None)
    if head is None:
        return None
    epilogue = next((p for p in info["parts"] if p["label"] == "epilogue"), None)
    calib = 0.0 if epilogue is None else epilogue["forward_s"] + epilogue["stats_s"] + epilogue["requant_s"]
    read, pack = head["read_s"] or 0.0, head["pack_s"] or 0.0
    rounding = head["seconds"] - pack if epilogue is None else epilogue["callback_s"] - read - pack
    return {
        "shape": f"{head['n']} x {head['k']}",
        "calibration_s": calib,
        "read_s": read,
        "rounding_s": rounding,
        "packing_s": pack,
        "total_s": calib + read + rounding + pack,
    }


def extrapolate(row: dict[str, Any], depth: int) -> dict[str, Any]:
    """Wall time and output size at ``depth`` blocks: the measured run plus the missing blocks at the mean
    block (block 0 excluded when there are more: it also waits for the workers), saving scaled by bytes."""
    blocks = row["per_block"]
    measured = [b for b in blocks if b["block"] > 0] or blocks
    block_s = sum(b["total_s"] for b in measured) / len(measured)
    block_bytes = sum(b["packed_bytes"] for b in measured) / len(measured)
    extra = depth - len(blocks)
    out_bytes = row["info"]["quantized_bytes"] + extra * block_bytes
    save = row["phases"]["save_s"] * (out_bytes / row["info"]["quantized_bytes"] - 1.0)
    wall = row["wall_seconds"] + extra * block_s + save
    return {
        "depth": depth,
        "block_s": block_s,
        "wall_s": wall,
        "output_gb": out_bytes / GB,
        "peak_rss_anon_gb": row["peak_rss_anon_mb"] * 1.048576e-3,
    }


def site_shapes(spec: ModelSpec, lm_head: bool) -> list[tuple[int, int]]:
    """``(N, K)`` of one decoder block's linear sites (q, k, v, o, gate, up, down), then the output projection."""
    d = spec.dims
    h, f, v = d["hidden_size"], d["intermediate_size"], d["vocab_size"]
    head_dim = d.get("head_dim", h // d["num_attention_heads"])
    q, kv = d["num_attention_heads"] * head_dim, d.get("num_key_value_heads", 1) * head_dim
    block = [(q, h), (kv, h), (kv, h), (h, q), (f, h), (f, h), (h, f)]
    return block + ([(v, h)] if lm_head else [])


def _features(n: float, k: float) -> list[float]:
    return [n * k * k, k**3, n * k]


def site_time_fit(sites: list[dict[str, Any]]) -> list[float] | None:
    """Non-negative ``(a, b, c)`` of ``seconds = a N K^2 + b K^3 + c N K`` over a run's sites (the
    per-row work under H, the factorisation, the per-weight work), by least squares with the features
    that come out negative dropped; None with fewer sites than features."""
    pts = [(s["n"], s["k"], s["seconds"] - (s.get("pack_s") or 0.0)) for s in sites if s.get("seconds")]
    if len(pts) < 3:
        return None
    x = np.array([_features(n, k) for n, k, _ in pts], dtype=np.float64)
    y = np.array([t for *_, t in pts], dtype=np.float64)
    keep = [0, 1, 2]
    while keep:
        coef = np.linalg.lstsq(x[:, keep], y, rcond=None)[0]
        if (coef >= 0).all():
            out = [0.0, 0.0, 0.0]
            for i, c in zip(keep, coef, strict=True):
                out[i] = float(c)
            return out
        keep.pop(int(np.argmin(coef)))
    return None


def shape_estimate(row: dict[str, Any], spec: ModelSpec) -> dict[str, Any] | None:
    """Rounding time of ``spec`` at full depth from ``row``'s per-site fit: one-core seconds, and wall with
    the blocks' sites at the run's measured parallelism (their summed seconds / the blocks' rounding wall),
    the output projection alone, and calibration per block scaled by the weights per block."""
    fit = site_time_fit(row["info"]["sites"])
    if fit is None:
        return None
    lm_head = row["lm_head"] != "none"
    shapes = site_shapes(spec, lm_head)
    per_block = [shapes[:7], shapes[7:]]
    core_block = sum(float(np.dot(fit, _features(n, k))) for n, k in per_block[0])
    core_head = sum(float(np.dot(fit, _features(n, k))) for n, k in per_block[1])
    busy = sum(
        s["seconds"] for s in row["info"]["sites"] if s.get("seconds") and block_of(s["name"]) is not None
    )
    parallel = max(busy / max(sum(b["rounding_s"] for b in row["per_block"]), 1e-9), 1.0)
    measured = MODELS[row["model"]]
    w_block = sum(n * k for n, k in per_block[0])
    w_measured = sum(n * k for n, k in site_shapes(measured, False)[:7])
    calib_block = row["phases"]["calibration_s"] / max(row["blocks"], 1) * w_block / w_measured
    core = spec.full_blocks * core_block + core_head
    return {
        "fit": fit,
        "core_h": core / 3600,
        "wall_h": (spec.full_blocks * (core_block / parallel + calib_block) + core_head) / 3600,
        "parallel": parallel,
    }


def peak_phase(row: dict[str, Any]) -> str:
    """Where the RssAnon peak fell: the decoder block or output projection being calibrated or rounded
    (the first site packed after it), else start-up or rewrite/save."""
    info, at = row["info"], row.get("peak_time") or 0.0
    if at < info["started_at"]:
        return "start-up"
    for site in info["sites"]:
        if site["done_at"] is not None and at <= site["done_at"]:
            block = block_of(site["name"])
            return "output projection" if block is None else f"block {block}"
    return "rewrite/save" if at <= info["ended_at"] else "after the run"


# -- the driver ----------------------------------------------------------------------------------------------
def run_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """The configuration a row measured (a new row replaces an older one with the same key)."""
    opts = json.dumps(row["method_options"] or {}, sort_keys=True)
    return (row["model"], row["dtype"], row["blocks"], row["method"], row["max_memory"], row["lm_head"], opts)


def unbudgeted_need(run: dict[str, Any], quick: bool) -> float:
    """GB the method's own memory model gives the largest site of ``name`` rounded in one piece (no row
    chunks): ``row_bytes`` per weight plus its fixed bytes; 0 for methods without one (data-free)."""
    from optimum.adaround.graph_passes import rounding  # noqa: F401  (registers the methods)
    from optimum.adaround.graph_passes.rounding.base import method_config

    cfg = method_config(run["method"], run["method_options"])
    row_bytes = getattr(cfg, "row_bytes", 0.0)
    if row_bytes <= 0:
        return 0.0
    spec = MODELS[run["model"]]
    dims = spec.quick if quick else spec.dims
    h, f, v = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
    shapes = [(h, f), (f, h)] + ([(h, v)] if run["lm_head"] != "none" else [])
    k, n = max(shapes, key=lambda kn: kn[0] * kn[1])
    return (row_bytes * n * k + cfg.fixed_bytes(n, k)) / GB


def export_row(name: str, dtype: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Build and export ``name`` into ``folder`` in a process of its own (stopped past the ceiling)."""
    r = run_function(
        export_job, args.timeout, limit_mb=args.ceiling * 1e3 / 1.048576,
        name=name, dtype=dtype, blocks=args.blocks, quick=args.quick, dest=str(folder),
    )  # fmt: skip
    row = {"model": name, "dtype": dtype, "blocks": args.blocks, "date": now(), "commit": commit(), **r}
    print(
        f"export {name} {dtype} {args.blocks} blocks: {r['wall_seconds']:.0f} s, peak RssAnon "
        f"{_gb(r['peak_rss_anon_mb'])} GB ({'ok' if r['ok'] else r['error']})",
        flush=True,
    )
    return row


def output_digest(folder: Path) -> str:
    """sha256 over the output's model files (graph and external data; not the records, which hold times),
    by name in sorted order: equal digests mean byte-equal models."""
    h = hashlib.sha256()
    for f in sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix not in {".json", ".yaml", ".md"}
    ):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def measure_run(src: Path, run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in a fresh process; the output folder is removed afterwards."""
    spec = MODELS[run["model"]]
    vocab = (spec.quick if args.quick else spec.dims)["vocab_size"]
    out = src.parent / f"{src.name}-q"
    stamp = {"date": now(), "commit": commit()}  # the code measured: later commits must not relabel it
    try:
        r = run_function(
            quantize_job, args.timeout, pss=True, limit_mb=args.ceiling * 1e3 / 1.048576,
            src=str(src), out=str(out), vocab=vocab, run=run,
        )  # fmt: skip
        if r["ok"]:
            r["output_sha256"] = output_digest(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    row = {**run, **stamp, "load_average": list(os.getloadavg()), **r}
    if row["ok"]:
        row["phases"], row["per_block"] = phases(row["info"]), per_block(row["info"])
        row["head"], row["peak_phase"] = head_figures(row["info"]), peak_phase(row)
        row["full_depth"] = extrapolate(row, spec.full_blocks)
    return row


def plan_runs(name: str, dtype: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every method under every budget; data-free methods once, without one (the budget bounds the
    rounding of calibrated methods only)."""
    from optimum.adaround.graph_passes import rounding  # noqa: F401  (registers the methods)
    from optimum.adaround.graph_passes.rounding.base import method_config

    runs = []
    for method in args.methods:
        calibrated = bool(method_config(method).needs)
        for budget in args.budgets if calibrated else [None]:
            runs.append(
                {
                    "model": name, "dtype": dtype, "blocks": args.blocks, "method": method,
                    "scheme": args.scheme, "lm_head": args.lm_head, "max_memory": budget,
                    "workers": args.workers, "calib_samples": args.calib_samples, "seq_len": args.seq_len,
                    "method_options": json.loads(args.method_options) if args.method_options else None,
                }
            )  # fmt: skip
    return runs


def run_model(name: str, dtype: str, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Export ``name`` in ``dtype``, quantize it under every configuration, delete the export."""
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-{dtype}-", dir=args.workdir))
    rows: list[dict[str, Any]] = []
    try:
        export = export_row(name, dtype, folder / "onnx", args)
        if not export["ok"]:
            return export, rows
        for run in plan_runs(name, dtype, args):
            need = unbudgeted_need(run, args.quick)
            if run["max_memory"] is None and need > args.ceiling:
                why = (
                    f"not run: without max_memory the run may take 90% of the available memory, and the "
                    f"method's own model gives its largest site ~{need:.0f} GB in one piece (ceiling "
                    f"{args.ceiling:g} GB)"
                )
                print(f"{run['method']}: {why}", flush=True)
                rows.append({**run, "ok": False, "skipped": why})
                continue
            row = measure_run(folder / "onnx", run, args)
            rows.append(row)
            print(_progress_line(row), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # multi-GB files: never leave them behind
    return export, rows


def _progress_line(row: dict[str, Any]) -> str:
    head = f"{row['model']} {row['dtype']} {row['method']} budget {row['max_memory']}"
    if not row["ok"]:
        return f"{head}: {row.get('error')}"
    p = row["phases"]
    return (
        f"{head}: {row['wall_seconds']:.0f} s (calibration {p['calibration_s']:.0f}, rounding "
        f"{p['rounding_s']:.0f}, packing {p['packing_s']:.1f}, save {p['save_s']:.1f}); peak RssAnon "
        f"{_gb(row['peak_rss_anon_mb'])} GB ({_split(row) or '?'}), PSS {_gb(row['peak_pss_mb'])} GB; sampling took "
        f"{row['sampler_cpu_s']:.0f} CPU-s"
    )


# -- results -------------------------------------------------------------------------------------------------
def hardware() -> dict[str, Any]:
    """CPU model, cores, RAM and GPU (where torch sees one) of this machine."""
    import torch

    ram_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "ram_gb": ram_kb * 1024 / GB, "gpu": gpu}


def merge(old: list[dict[str, Any]], new: list[dict[str, Any]], key: Any) -> list[dict[str, Any]]:
    """``old`` rows with those ``new`` measures again replaced, in the order first seen."""
    fresh = {key(r): r for r in new}
    kept = [fresh.pop(key(r), r) for r in old]
    return kept + list(fresh.values())


def command_line(argv: list[str]) -> str:
    """The command that measured a row, for the results (``--workdir`` left out: it is where, not what)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip or arg.startswith("--workdir="):
            skip = False
            continue
        skip = arg == "--workdir"
        if not skip:
            kept.append(shlex.quote(arg))
    return " ".join(["python benchmarks/scale.py", *kept])


def write_results(exports: list[dict], rows: list[dict], command: str) -> dict[str, Any]:
    """Merge the new rows into ``scale.json`` and write ``scale.md`` (its ``## Reading`` section kept)."""
    for row in [*exports, *rows]:
        row["command"] = command
    json_path = RESULTS / "scale.json"
    old = json.loads(json_path.read_text()) if json_path.is_file() else {"exports": [], "runs": []}
    data = {
        "meta": {
            "updated": now(),
            "hardware": hardware(),
            "memory": "peak summed RssAnon of the quantizing process and its workers (sampled every 50 ms); "
            "PSS beside it; GB = 1e9 bytes",
        },
        "exports": merge(old["exports"], exports, lambda r: (r["model"], r["dtype"], r["blocks"])),
        "runs": merge(old["runs"], rows, run_key),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    md_path = RESULTS / "scale.md"
    reading = ""
    if md_path.is_file() and "\n## Reading" in md_path.read_text():
        reading = md_path.read_text()[md_path.read_text().index("\n## Reading") :]
    md_path.write_text(markdown(data) + reading)
    return data


def _gb(mb: float | None) -> str:
    return "-" if mb is None else f"{mb * 1.048576e-3:.2f}"


def _budget(row: dict[str, Any]) -> str:
    return "none" if row["max_memory"] is None else f"{row['max_memory']:g} GB"


def _split(row: dict[str, Any]) -> str:
    """The peak's RssAnon by process, main process first (not recorded by older rows)."""
    return " + ".join(_gb(mb) for mb in row.get("peak_rss_anon_by_process_mb") or [])


def _label(row: dict[str, Any]) -> str:
    opts = row.get("method_options")
    extra = "" if not opts else " (" + ", ".join(f"{k}={v}" for k, v in opts.items()) + ")"
    return f"| {row['model']} | {row['dtype']} | {row['method']}{extra} | {_budget(row)} |"


def _export_table(exports: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | dtype | blocks | parameters | ONNX files (GB) | build (s) | export (s) | gather (s) | wall (s) | peak RssAnon (GB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in exports:
        i = e.get("info") or {}
        if not e["ok"]:
            lines.append(f"| {e['model']} | {e['dtype']} | {e['blocks']} | failed: {e.get('error')} |||||||")
            continue
        lines.append(
            f"| {e['model']} | {e['dtype']} | {e['blocks']} | {i['n_params'] / 1e9:.3f} B | {i['onnx_bytes'] / GB:.2f} | "
            f"{i['build_s']:.0f} | {i['export_s']:.0f} | {i['gather_s']:.0f} | {e['wall_seconds']:.0f} | "
            f"{_gb(e['peak_rss_anon_mb'])} |"
        )
    return lines


def _run_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | dtype | method | max_memory | wall | calibration | weight read | rounding | packing | rewrite | save | "
        "peak RssAnon (GB) | at the peak, by process | peak PSS (GB) | processes | peak during | load | output sha256 | "
        "result |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---|---|",
    ]
    for r in rows:
        if not r["ok"]:
            why = r.get("skipped") or r.get("error")
            peak = _gb(r.get("peak_rss_anon_mb"))
            lines.append(f"{_label(r)} {r.get('wall_seconds', 0):.0f} ||||||| {peak} ||||||| {why} |")
            continue
        ph = r["phases"]
        lines.append(
            f"{_label(r)} {r['wall_seconds']:.0f} | {ph['calibration_s']:.1f} | {ph['read_s']:.1f} | {ph['rounding_s']:.1f} | "
            f"{ph['packing_s']:.1f} | {ph['rewrite_s']:.1f} | {ph['save_s']:.1f} | {_gb(r['peak_rss_anon_mb'])} | "
            f"{_split(r)} | {_gb(r['peak_pss_mb'])} | {r['max_processes']} | {r['peak_phase']} | {r['load_average'][0]:.1f} | "
            f"{r['output_sha256'][:16] if r.get('output_sha256') else ''} | ok |"
        )
    return lines


def _block_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | dtype | method | max_memory | block | calibration | weight read | rounding | packing | total |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in (r for r in rows if r["ok"]):
        parts = [(str(b["block"]), b) for b in r["per_block"]]
        if r["head"] is not None:
            parts.append((f"output projection {r['head']['shape']}", r["head"]))
        for label, b in parts:
            lines.append(
                f"{_label(r)} {label} | {b['calibration_s']:.1f} | {b['read_s']:.1f} | {b['rounding_s']:.1f} | "
                f"{b['packing_s']:.1f} | {b['total_s']:.1f} |"
            )
    return lines


def _depth_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | dtype | method | max_memory | measured blocks | per block (s) | full depth | est. wall | est. output (GB) | peak RssAnon measured (GB) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in (r for r in rows if r["ok"]):
        f = r["full_depth"]
        lines.append(
            f"{_label(r)} {r['blocks']} | {f['block_s']:.1f} | {f['depth']} | {f['wall_s'] / 60:.0f} min "
            f"({f['wall_s'] / 3600:.1f} h) | {f['output_gb']:.2f} | {f['peak_rss_anon_gb']:.2f} |"
        )
    return lines


def _estimate_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | dtype | method | max_memory | estimated for | fit a (ns per N K^2) | b (ns per K^3) | "
        "c (ns per N K) | rounding, one core | est. wall (blocks at the run's parallelism) |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if not r["ok"] or r["method"] == "rtn":
            continue
        for name, spec in MODELS.items():
            if name == "gemma3-270m":
                continue
            widest = max(k for _, k in site_shapes(spec, False))
            if 2 * max(st["k"] for st in r["info"]["sites"]) < widest:
                continue  # a fit over sites under half as wide says little about these
            e = shape_estimate(r, spec)
            if e is None:
                continue
            a, b, c = (1e9 * v for v in e["fit"])
            lines.append(
                f"{_label(r)} {name}, {spec.full_blocks} blocks | {a:.3g} | {b:.3g} | {c:.3g} | "
                f"{e['core_h']:.1f} h | {e['wall_h']:.1f} h ({e['parallel']:.1f} block sites at once) |"
            )
    return lines


def _intro(data: dict[str, Any]) -> list[str]:
    """What was measured, on which machine and commits, and the commands that measured it."""
    hw, rows = data["meta"]["hardware"], data["runs"]
    dates = sorted({r["date"] for r in rows if "date" in r})
    when = dates[0] if len(dates) < 2 else f"{dates[0]} to {dates[-1]}"
    commits = ", ".join(sorted({r["commit"] for r in rows if "commit" in r}))
    calib = ", ".join(sorted({f"{r['calib_samples']} x {r['seq_len']}" for r in rows}))
    gpu = f"; GPU {hw['gpu']} (unused)" if hw["gpu"] else "; no GPU"
    commands = sorted({r["command"] for r in [*data["exports"], *rows] if r.get("command")})
    return [
        "# Scale: `quantize` at billion-parameter widths, a few decoder blocks deep",
        "",
        f"Measured {when} on {hw['cpu']}, {hw['cores']} cores, {hw['ram_gb']:.0f} GB RAM{gpu}; commits "
        f"{commits} (rows name theirs). Random weights (seeded normal, std 0.02) at real dimensions, a few "
        "decoder blocks deep: Llama-3-8B (output projection 128256 x 4096), Llama-2-70B (sites up to "
        "28672 x 8192), Gemma-3-270M (`gemma3_text`, tied 262144 x 640 output projection), exported by "
        "Optimum (text-generation-with-past). W4 g128, output projection at the run's scheme "
        f'(`lm_head="scheme"`), embedding at 8 bits (the default). Calibration on random token ids, {calib} '
        "(sequences x tokens): deliberately small, so these are the pipeline's costs at these widths, not "
        "quality figures. Each configuration ran in a fresh process; wall times include its start-up; other "
        "processes shared the 2 cores at times (`load` is the 1-minute load average when the row ended).",
        "",
        "Memory: the peak of the summed RssAnon of the quantizing process and its rounding workers, sampled "
        "every 50 ms (weights read through memory-mapped files are file-backed pages and not counted), "
        "with the summed PSS (which counts the resident mapped pages) beside it; GB = 1e9 bytes. "
        "`processes`: the most processes the tree held at once. `weight read`: the float32 copy of a weight "
        "the run's process makes (data-free methods; calibrated methods are handed a view and read it by "
        "row chunks inside the rounding). Packing is pack + spill of each site, in the run's process.",
        "",
        "Reproduce (`--quick` checks the script on tiny dims in a minute):",
        "",
        *[f"    {c}" for c in commands],
        "",
    ]


def markdown(data: dict[str, Any]) -> str:
    """The results page: what was measured on which machine and commit, and the tables."""
    rows = data["runs"]
    lines = [
        *_intro(data),
        "## Exports",
        "",
        "The parameters are drawn into memory-mapped files, so an export's RssAnon is what Optimum's exporter "
        "allocates; its external data is gathered into one file by onnx-ir's streamed save (`gather`).",
        "",
        *_export_table(data["exports"]),
        "",
        "## Runs (wall time and phases in seconds)",
        "",
        *_run_table(rows),
        "",
        "## Per decoder block and output projection (seconds)",
        "",
        *_block_table(rows),
        "",
        "## At full depth (extrapolated from the measured blocks)",
        "",
        "The measured run plus (full depth - measured blocks) x the mean block (block 0 excluded: it also "
        "waits for the workers to start), saving scaled by the bytes written. The peak memory column is the "
        "measured one: sites are rounded block by block, so it is not expected to grow with depth.",
        "",
        *_depth_table(rows),
        "",
        "## Other widths (estimated from the measured sites)",
        "",
        "Each calibrated run's site times fitted as `a N K^2 + b K^3 + c N K` seconds (the per-row work under "
        "H, the factorisation, the per-weight work; non-negative least squares over its sites), then summed "
        "over the sites of Llama-3-8B and Llama-2-70B at full depth with their output projection, from runs whose "
        "sites reach at least half the target's widest K. An estimate: the 70B sites are wider than any "
        "measured (K up to 28672 against 14336).",
        "",
        *_estimate_table(rows),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "fp16"])
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq", "adaround"])
    p.add_argument("--blocks", type=int, default=2, help="decoder blocks built (default 2)")
    p.add_argument(
        "--budgets", nargs="+", default=["none"], help="max_memory values in GB; 'none' = no budget given"
    )
    p.add_argument("--scheme", default="w4-g128")
    p.add_argument(
        "--lm-head", default="scheme", help="lm_head option: scheme (the run's scheme), none, 8..."
    )
    p.add_argument("--workers", type=int, default=None, help="rounding processes (default: the API's)")
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--method-options", default=None, help="JSON, e.g. '{\"iters\": 20}'")
    p.add_argument("--ceiling", type=float, default=12.0, help="GB of tree RssAnon at which a run is stopped")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per process")
    p.add_argument("--workdir", type=Path, default=WORKDIR, help="where the exports go (deleted after use)")
    p.add_argument("--quick", action="store_true", help="tiny dims: checks the script (nothing written)")
    p.add_argument("--no-write", action="store_true", help="print only, do not write benchmarks/results")
    p.add_argument("--render", action="store_true", help="only rewrite scale.md from scale.json (no runs)")
    args = p.parse_args()
    if args.render:
        write_results([], [], "")
        return
    args.budgets = [None if b == "none" else float(b) for b in args.budgets]
    args.workdir.mkdir(parents=True, exist_ok=True)
    exports, rows = [], []
    for name in args.models:
        for dtype in args.dtype:
            export, model_rows = run_model(name, dtype, args)
            exports.append(export)
            rows += model_rows
    if args.quick or args.no_write:
        print(markdown({"meta": {"hardware": hardware()}, "exports": exports, "runs": rows}))
        return
    write_results(exports, rows, command_line(sys.argv[1:]))


if __name__ == "__main__":
    main()
