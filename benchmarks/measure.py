"""How the benchmarks measure one job: wall time and peak memory of the process tree that runs it.

Peak memory is the summed ``RssAnon`` (``/proc/PID/status``) of a process and its descendants (the rounding
workers), sampled by a thread: anonymous memory is what the job really allocates; max RSS would also count
memory-mapped weight pages, which the kernel can drop at will. Linux only.

The benchmarks are scripts, not a package: they import this module as ``measure`` with ``benchmarks/``
first on ``sys.path``.
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import subprocess
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def rss_anon_kb(pid: int) -> int | None:
    """RssAnon of ``pid`` and all its descendants, in kB; None when ``pid`` is gone."""
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


class PeakRss:
    """Peak summed RssAnon of a process tree, sampled every ``interval`` seconds while the ``with`` lasts."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval, self.kb = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            kb = rss_anon_kb(self.pid)
            if kb is not None:
                self.kb = max(self.kb, kb)
            self._stop.wait(self.interval)

    @property
    def mb(self) -> float:
        return self.kb / 1024.0

    def start(self) -> PeakRss:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> PeakRss:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the architecture where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """The hardware a benchmark ran on, for its results' metadata."""
    return f"{cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def commit() -> str:
    """The repository's commit (``+dirty`` when tracked files differ from it), or ``unknown``."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD"], check=False).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def provenance() -> dict[str, Any]:
    """Where and when a row was measured: stored with each row."""
    return {"date": now(), "machine": machine(), "commit": commit(), "load_average": list(os.getloadavg())}


def emit(result: dict[str, Any], text: str, json_path: Path | None, md_path: Path | None) -> None:
    """Write a benchmark's result (JSON) and its markdown where asked, and print the markdown."""
    if json_path:
        json_path.write_text(json.dumps(result, indent=1))
    if md_path:
        md_path.write_text(text + "\n")
    print(text)


def _child(fn: Callable[..., dict[str, Any]], kwargs: dict[str, Any], conn: Any) -> None:
    try:
        info = fn(**kwargs) or {}
        conn.send({"ok": True, "info": info})
    except BaseException as e:  # every failure is reported (the row records it); the parent decides
        first = str(e).splitlines()[0] if str(e) else ""
        conn.send(
            {
                "ok": False,
                "error": f"{type(e).__name__}: {first}"[:400],
                "traceback": traceback.format_exc()[-3000:],
            }
        )
    finally:
        conn.close()


def run_function(fn: Callable[..., dict[str, Any]], timeout_s: float = 1800, **kwargs: Any) -> dict[str, Any]:
    """Run ``fn(**kwargs)`` (a module-level function) in a spawned process: ``ok``, ``info`` (its result) or
    ``error``, ``wall_seconds`` (interpreter start-up included) and ``peak_rss_anon_mb`` of its tree."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    # not daemonic: the quantizer starts its own rounding workers, as it does for a user
    proc = ctx.Process(target=_child, args=(fn, kwargs, child), daemon=False)
    t0 = time.perf_counter()
    proc.start()
    child.close()
    result: dict[str, Any] | None = None
    with PeakRss(proc.pid) as peak:
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
    return {**result, "wall_seconds": wall, "peak_rss_anon_mb": peak.mb}


def run_command(argv: list[str], timeout_s: float) -> dict[str, Any]:
    """Run ``argv`` as a child process: ``ok``, ``error`` (its last stderr line), wall time and peak memory."""
    t0 = time.perf_counter()
    with (
        subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc,
        PeakRss(proc.pid) as peak,
    ):
        try:
            _, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
            stderr += f"\nstopped after the timeout of {timeout_s:.0f} s"
    error = None
    if proc.returncode != 0:
        error = f"exit code {proc.returncode}: {(stderr.strip().splitlines() or ['(no output)'])[-1]}"
    return {
        "ok": error is None,
        "error": error,
        "wall_seconds": time.perf_counter() - t0,
        "peak_rss_anon_mb": peak.mb,
    }
