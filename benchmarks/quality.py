"""Side-by-side quality benchmark on SmolLM2-135M: onnxruntime's weight-only quantizers vs ours.

One command measures every row and writes ``benchmarks/results/quality/`` (one JSON file per row, see
``quality_store.py``), ``benchmarks/RESULTS.md`` (rendered from those files by ``quality_report.py``) and
the PNG plots::

    python benchmarks/quality.py            # full run (~30-40 min on 2 CPU cores)
    python benchmarks/quality.py --quick    # W4 g128 only, fewer tokens: a smoke test of the whole path
    python benchmarks/quality.py --resume   # after a stop: measure only the rows not written yet

Protocol (identical for every tool): the fp32 Optimum export of the embedded SmolLM2-135M-Instruct; the
tied, Transpose-fed lm_head stays fp32 everywhere (onnxruntime's quantizer skips it, ours is told to);
perplexity through onnxruntime CPU on the embedded Wikipedia evaluation split (``optimum.adaround.evaluation``:
non-overlapping windows, BOS first); calibration (for the methods that use it) on random windows of the
embedded Wikipedia *calibration* split, which shares no article with the evaluation split. Each
quantization runs in a fresh spawned process whose anonymous resident memory (``RssAnon``, with its
workers') is sampled every 50 ms; its wall time includes loading and saving the model (``measure.py``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling modules; the jobs must be importable by a spawned process
from decode_speed import speed_rows  # noqa: E402
from measure import provenance, run_function  # noqa: E402
from quality_report import OUR_VARIANTS, render  # noqa: E402
from quality_store import DONE, NOT_REACHED, Row, Store  # noqa: E402
from quantizers import ort_job, ours_job, weights_digest  # noqa: E402

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
# Minutes per scheme on 2 CPU cores: run only at --slow-schemes unless asked otherwise.
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
# Flags that change no number: left out of the command a run records.
_SCRATCH_FLAGS, _SCRATCH_OPTIONS = {"--resume", "--keep", "--no-progress"}, {"--work", "--out"}


def _log(msg: str) -> None:
    print(f"[{dt.datetime.now(dt.timezone.utc).strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def recorded_command(argv: list[str]) -> str:
    """The command a run records: its arguments without the flags that change no number."""
    kept, skip = [], False
    for a in argv:
        if skip or a in _SCRATCH_FLAGS or a.split("=")[0] in _SCRATCH_OPTIONS:
            skip = a in _SCRATCH_OPTIONS
            continue
        kept.append(a)
    return " ".join(["python benchmarks/quality.py", *kept])


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every stored row depends on; a resumed run must ask the same."""
    keys = (
        "eval_tokens",
        "context",
        "calib_samples",
        "calib_seq_len",
        "prompt_tokens",
        "new_tokens",
        "threads",
    )
    return {k: getattr(args, k) for k in keys}


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


def plan(args: argparse.Namespace) -> list[Row]:
    """Every row the command asks for, in table order."""
    lowbit = _lowbit_available()
    rows = [Row("fp32", "fp32", "fp32", status=NOT_REACHED, format="fp32")]
    for label in args.schemes:
        fmt = _our_format(SCHEMES[label][0], lowbit)
        for tool, method in ORDER:
            if method in (args.ort if tool == "onnxruntime" else args.ours):
                shown = fmt if tool == "ours" else "matmulnbits"
                shown = "qdq (3-bit emulated in int4)" if shown == "qdq" else shown
                rows.append(Row(label, tool, method, status=NOT_REACHED, format=shown))
    return rows


def evaluate_row(row: Row, args: argparse.Namespace, text: str, reference: Path) -> None:
    """Perplexity, size, bits per weight and per-layer weight SQNR of ``row``'s model into ``row``."""
    from optimum.adaround.evaluation import evaluate

    t0 = time.perf_counter()
    try:
        report = evaluate(
            Path(row.path),
            text=text,
            reference=None if row.tool == "fp32" else reference,
            context_length=args.context,
            max_tokens=args.eval_tokens,
            progress=not args.no_progress,
            # exact fp32 math for QDQ too (ORT would otherwise fuse DQ+MatMul at int8 accuracy)
            session_config={"session.qdq_matmulnbits_accuracy_level": "0"},
        )
        if report.perplexity is None:
            raise RuntimeError("no perplexity computed")
    except Exception as e:
        row.status, row.note = (
            "error",
            f"evaluation failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
        )
        return
    row.eval_seconds = time.perf_counter() - t0
    row.perplexity, row.tokens = report.perplexity.perplexity, report.perplexity.tokens
    row.model_mb, row.bits_per_weight = report.model_bytes / 1e6, report.bits_per_weight
    row.mean_weight_sqnr_db = report.to_dict()["mean_weight_sqnr_db"]
    if report.unreadable_sites:
        row.note = (row.note + f"; {len(report.unreadable_sites)} custom-op sites not counted").strip("; ")
    row.weight_sqnr_db = report.weight_sqnr_db or None


class Bench:
    """One run: measures the planned rows, writes each row's JSON when it is finished and RESULTS.md after."""

    def __init__(
        self, args: argparse.Namespace, work: Path, fp32_dir: Path, text: str, token_ids: Path, command: str
    ) -> None:
        self.args, self.work, self.fp32_dir, self.text = args, work, fp32_dir, text
        self.token_ids, self.command = str(token_ids), command
        self.results = args.out / "results"
        self.store = Store(self.results)
        self.settings = settings(args)
        self.rows: list[Row] = []

    def folder(self, row: Row) -> Path:
        """Where ``row``'s quantized model is written under ``--work``."""
        return self.work / f"{row.scheme}-{'ort' if row.tool == 'onnxruntime' else 'ours'}-{row.method}"

    def save(self, row: Row) -> None:
        """Store the finished ``row`` and render RESULTS.md again (a stopped run keeps every finished row)."""
        from optimum.adaround.plots import plot_perplexity_vs_bits

        row.settings, row.measured = self.settings, provenance()
        self.store.write_row(row)
        rows = self.store.planned_rows()
        points = [
            {"method": f"{r.tool}:{r.method}", "label": r.scheme}
            | {"bits_per_weight": r.bits_per_weight, "perplexity": r.perplexity}
            for r in rows
            if r.tool != "fp32" and r.perplexity is not None
        ]
        if points:
            fp32 = rows[0].perplexity
            title = "SmolLM2-135M: perplexity vs bits per weight"
            plot_perplexity_vs_bits(
                points, self.results / "ppl_vs_bits.png", fp32_perplexity=fp32, title=title
            )
        render(self.args.out)

    def _measured(self, row: Row, res: dict[str, Any]) -> bool:
        row.quant_seconds, row.peak_rss_anon_mb = res["wall_seconds"], res["peak_rss_anon_mb"]
        if not res["ok"]:
            row.status, row.note = "error", res["error"]
            _log(f"  failed: {res['error']}")
            return False
        row.status, row.path = "ok", str(self.folder(row))
        return True

    def _evaluate(self, row: Row) -> None:
        from optimum.adaround.plots import plot_sqnr_bars

        evaluate_row(row, self.args, self.text, self.fp32_dir)
        _log(f"  ppl {row.perplexity}  ({row.quant_seconds or 0:.0f} s, {row.peak_rss_anon_mb or 0:.0f} MB)")
        if row.weight_sqnr_db and (row.tool == "ours" or row.method == "default"):
            row.plot = f"sqnr_{row.scheme}_{row.tool}_{row.method}.png"
            title = f"Per-layer weight SQNR, {row.scheme}, {row.tool} {row.method}"
            plot_sqnr_bars(row.weight_sqnr_db, self.results / row.plot, title=title)

    def _not_applicable(self, row: Row, bits: int) -> str | None:
        """Why ``row`` is not run, or None."""
        method = OUR_VARIANTS.get(row.method, (row.method,))[0]
        if row.tool == "onnxruntime" and method in ("rtn", "gptq", "kquant") and bits != 4:
            return "4-bit only in onnxruntime's quantizer"
        if row.tool == "onnxruntime" and method == "hqq" and bits not in (2, 4, 8):
            return "MatMulNBits runs 2/4/8 bits only (3-bit HQQ could not be run)"
        if row.tool == "ours":
            from optimum.adaround.graph_passes.rounding.base import METHODS

            if method not in METHODS:
                return f"method {method!r} not registered (registered: {sorted(METHODS)})"
        if method in SLOW and row.scheme not in self.args.slow_schemes:
            return "not run: slow, limited to --slow-schemes in this run"
        return None

    def run_ort(self, row: Row, bits: int, group: int, rtn_digest: list[str | None]) -> None:
        algo = row.method
        _log(f"{row.scheme}: onnxruntime {algo}")
        out = self.folder(row)
        ids = self.token_ids if algo == "gptq" else None
        kwargs = {"src": str(self.fp32_dir), "out": str(out), "token_ids_file": ids}
        res = run_function(ort_job, self.args.job_timeout, algo=algo, bits=bits, group=group, **kwargs)
        if not self._measured(row, res):
            return
        try:
            digest: str | None = weights_digest(out)
        except Exception as e:  # a model our reader cannot parse still gets evaluated
            digest, row.note = None, f"weights not readable: {type(e).__name__}"
        if algo == "rtn":
            rtn_digest[0] = digest
        elif algo == "gptq" and digest is not None and rtn_digest[0] is not None:
            same = digest == rtn_digest[0]
            row.note = (
                "packed weights byte-identical to onnxruntime rtn (its GPTQ propagates no error)"
                if same
                else "packed weights differ from onnxruntime rtn"
            )
            if same:  # same packed bytes and same graph as the rtn row: its evaluation applies unchanged
                rtn = next(r for r in self.rows if r.key == (row.scheme, row.tool, "rtn"))
                for f in ("perplexity", "tokens", "model_mb", "bits_per_weight", "mean_weight_sqnr_db"):
                    setattr(row, f, getattr(rtn, f))
                row.note += ": evaluation of the rtn row reused"
                return
        self._evaluate(row)

    def run_ours(self, row: Row) -> None:
        method, options = OUR_VARIANTS.get(row.method, (row.method, {}))
        fmt = row.format.split(" ")[0]
        _log(f"{row.scheme}: ours {row.method} ({fmt})")
        kwargs = {"src": str(self.fp32_dir), "out": str(self.folder(row)), "token_ids_file": self.token_ids}
        scheme = f"{row.scheme}-sym"
        res = run_function(
            ours_job,
            self.args.job_timeout,
            method=method,
            scheme=scheme,
            fmt=fmt,
            method_options=options or None,
            **kwargs,
        )
        if self._measured(row, res):
            row.site_counts = (res.get("info") or {}).get("site_counts")
            self._evaluate(row)

    def measure(self, row: Row, rtn_digests: dict[str, list[str | None]]) -> None:
        if row.tool == "fp32":
            row.status, row.path = "ok", str(self.fp32_dir)
            _log("evaluating fp32")
            self._evaluate(row)
            return
        if self.folder(row).exists():  # left by a run stopped before this row finished: redo it
            shutil.rmtree(self.folder(row))
        bits, group = SCHEMES[row.scheme]
        if reason := self._not_applicable(row, bits):
            row.status, row.note = "n/a", reason
        elif row.tool == "onnxruntime":
            self.run_ort(row, bits, group, rtn_digests.setdefault(row.scheme, [None]))
        else:
            self.run_ours(row)

    def resumed(self) -> tuple[set[tuple[str, str, str]], list[dict[str, Any]]]:
        """The rows (and speed rows) an earlier run wrote with the same settings; refuses other settings."""
        rows = {k: r for k, r in self.store.read_rows().items() if r.status in DONE}
        speed = self.store.read_speed()
        written = [(self.store.row_file(k).name, r.settings) for k, r in rows.items()]
        for name, stored in written + [(f"speed row {s['model']!r}", s.get("settings")) for s in speed]:
            if stored != self.settings:
                raise SystemExit(
                    f"--resume: {name} in {self.store.dir} was measured with {stored}, this run asks "
                    f"{self.settings}; run without --resume to measure every row again"
                )
        self.rows = [rows.get(r.key, r) for r in self.rows]
        for row in self.rows:
            if row.key in rows:  # its model, if still there, is what the speed table times
                row.path = str(self.folder(row)) if self.folder(row).is_dir() else ""
        _log(f"resumed: {len(rows)} rows and {len(speed)} speed rows already measured")
        return set(rows), speed

    def speed(self, prompt: np.ndarray) -> None:
        low = next((r for r in self.rows if r.tool == "ours" and r.format == "lowbit" and r.path), None)
        lowbit = (low.method, Path(low.path)) if low is not None and low.status == "ok" else None
        make = self.args.speed_only and _lowbit_available()  # no quality rows: our data-free rtn makes one
        rows = speed_rows(self.work, self.fp32_dir, prompt, self.settings, lowbit, make)
        self.store.write_speed([{**r, "settings": self.settings, "measured": provenance()} for r in rows])
        render(self.args.out)

    def run(self) -> None:
        from optimum.adaround.data.text import load_tokenizer, token_stream

        prompt = token_stream(load_tokenizer(str(self.fp32_dir)), [self.text])[: self.args.prompt_tokens]
        self.rows = plan(self.args)
        done, speed = self.resumed() if self.args.resume else (set(), [])
        if not self.args.resume:
            self.store.clear()
        planned = [[*r.key, r.format] for r in self.rows]
        record = {
            "command": self.command,
            "settings": self.settings,
            "plan": planned,
            "speed": not self.args.no_speed,
        }
        self.store.write_run(record)
        want_speed = not self.args.no_speed and not speed
        rtn_digests: dict[str, list[str | None]] = {}
        current = None
        # Breadth first: the fast rows of every scheme, then the slow methods (minutes per scheme) in
        # SLOW_ORDER; the table keeps the plan's order. A run stopped early has a complete rtn/gptq picture.
        slow_last = sorted(
            self.rows[1:], key=lambda r: SLOW_ORDER.index(r.method) + 1 if r.method in SLOW else 0
        )
        for row in [self.rows[0], *slow_last]:
            if current == "w3-g128" and row.scheme != current and want_speed:
                self.speed(prompt)  # after the 3-bit scheme, whose lowbit model it times
                want_speed = False
            current = row.scheme
            if row.key not in done:
                self.measure(row, rtn_digests)
                self.save(row)
        if want_speed:
            self.speed(prompt)
        render(self.args.out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
        help="keep the rows a stopped run already wrote under --out (same settings) and measure the rest",
    )
    p.add_argument(
        "--render",
        action="store_true",
        help="only rewrite RESULTS.md from results/quality/ (numbers unchanged)",
    )
    args = p.parse_args(argv)
    if args.speed_only:
        args.schemes, args.ort, args.ours = [], [], []
    if args.quick:
        args.schemes, args.ort, args.ours = ["w4-g128"], ["default"], ["rtn", "gptq"]
        args.eval_tokens, args.new_tokens = 1024, 16
    return args


def run(args: argparse.Namespace, fp32_dir: Path, text: str, command: str) -> None:
    """Measure the rows ``args`` ask for on the fp32 export ``fp32_dir``, perplexity on ``text``."""
    from optimum.adaround.data.text import calibration_token_ids

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="adaround-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    token_ids = work / "calib_token_ids.npy"
    np.save(token_ids, calibration_token_ids(fp32_dir, None, args.calib_samples, args.calib_seq_len, seed=0))
    try:
        Bench(args, work, fp32_dir, text, token_ids, command).run()
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.render:
        render(args.out)
        return 0
    from optimum.adaround.api import quantize  # noqa: F401  (fail early when our API is missing)
    from optimum.adaround.data.default_model import default_onnx_dir
    from optimum.adaround.data.text import evaluation_text

    t_start = time.perf_counter()
    run(args, default_onnx_dir(), evaluation_text(), recorded_command(argv))
    _log(f"done in {(time.perf_counter() - t_start) / 60:.1f} min: {args.out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
