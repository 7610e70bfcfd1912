"""How the benchmarks measure one job: wall time and peak memory of the process tree that runs it.

Peak memory is the summed ``RssAnon`` (``/proc/PID/status``) of a process and its descendants (the rounding
workers), sampled by a thread: anonymous memory is what the job really allocates; max RSS would also count
memory-mapped weight pages, which the kernel can drop at will. The summed PSS (``smaps_rollup``: what
``psutil.Process.memory_full_info().pss`` reads) can be sampled beside it for reference: it counts the mapped
pages that are resident, each shared page split among the processes mapping it. Linux only.

The benchmarks are scripts, not a package: they import this module as ``measure`` with ``benchmarks/``
first on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive (``pid`` first; empty when it is gone)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            children = []
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    children += [int(c) for c in fh.read().split()]
        except (OSError, ValueError):
            continue  # gone between listing and reading
        pids.append(p)
        todo += children
    return pids


def _field_kb(path: str, key: str) -> int | None:
    """The kB figure of the line starting with ``key`` in a /proc file (0 if absent), None when unreadable."""
    try:
        with open(path) as fh:
            return next((int(line.split()[1]) for line in fh if line.startswith(key)), 0)
    except (OSError, ValueError):
        return None


def _each_kb(pids: list[int], file: str, key: str) -> list[int]:
    """The figure of each process still readable, in the order of ``pids``."""
    return [v for p in pids if (v := _field_kb(f"/proc/{p}/{file}", key)) is not None]


def _sum_kb(pids: list[int], file: str, key: str) -> int | None:
    values = _each_kb(pids, file, key)
    return sum(values) if values else None


def rss_anon_kb(pid: int) -> int | None:
    """RssAnon of ``pid`` and all its descendants, in kB; None when ``pid`` is gone."""
    return _sum_kb(tree_pids(pid), "status", "RssAnon:")


def pss_kb(pid: int) -> int | None:
    """PSS of ``pid`` and all its descendants, in kB (mapped file pages included); None when it is gone."""
    return _sum_kb(tree_pids(pid), "smaps_rollup", "Pss:")


PSS_INTERVAL = 1.0
"""Seconds between PSS readings at least (RssAnon is read every ``interval``)."""


class PeakRss:
    """Peak summed RssAnon of a process tree, sampled every ``interval`` seconds while the ``with`` lasts.

    With ``pss``, also the peak summed PSS (read by a second thread every ``PSS_INTERVAL`` seconds or
    more: a large tree's ``smaps_rollup`` takes a good part of a second of kernel time to read) and the
    most processes the tree held at once. ``peak_time`` is the
    ``time.monotonic()`` of the RssAnon peak (comparable across processes). With ``limit_kb``, a tree whose
    RssAnon passes it is killed (``exceeded`` is set): a guard for machines shared with others."""

    def __init__(
        self, pid: int, interval: float = 0.05, pss: bool = False, limit_kb: int | None = None
    ) -> None:
        self.pid, self.interval, self.pss, self.limit_kb = pid, interval, pss, limit_kb
        self.kb = self.pss_kb = self.processes = self.samples = 0
        self.seconds = self.peak_time = 0.0
        self.peak_split_kb: list[int] = []
        """At the peak, each process's RssAnon (the tree's root first, then its descendants)."""
        self.exceeded = False
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._sample, daemon=True)]
        if pss:
            self._threads.append(threading.Thread(target=self._sample_pss, daemon=True))

    def _tick(self) -> None:
        pids = tree_pids(self.pid)
        each = _each_kb(pids, "status", "RssAnon:")
        kb = sum(each) if each else None
        if kb is not None and kb > self.kb:
            self.kb, self.peak_time, self.peak_split_kb = kb, time.monotonic(), each
        self.processes = max(self.processes, len(pids))
        if self.limit_kb is not None and kb is not None and kb > self.limit_kb:
            self.exceeded = True
            for p in reversed(pids):  # the children first, so none is left orphaned
                with contextlib.suppress(OSError):
                    os.kill(p, signal.SIGKILL)

    def _sample(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set():
            self._tick()
            self.samples += 1
            self._stop.wait(self.interval)
        self.seconds = time.perf_counter() - t0

    def _sample_pss(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            self.pss_kb = max(self.pss_kb, pss_kb(self.pid) or 0)
            # the kernel walks every mapped page to answer: keep that under a tenth of a core
            self._stop.wait(max(PSS_INTERVAL, 10 * (time.perf_counter() - t0)))

    @property
    def mb(self) -> float:
        return self.kb / 1024.0

    @property
    def mean_interval(self) -> float:
        """The sampling period achieved (reading a large tree's PSS takes time of its own)."""
        return self.seconds / max(self.samples, 1)

    def start(self) -> PeakRss:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

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
    """The repository's commit (``+dirty`` when tracked files outside ``benchmarks/results`` differ from it),
    or ``unknown``."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        # results written by an earlier step of the same run do not make the code measured dirty
        dirty = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", ".", ":!benchmarks/results"],
                               check=False).returncode  # fmt: skip
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


def run_function(
    fn: Callable[..., dict[str, Any]],
    timeout_s: float = 1800,
    pss: bool = False,
    limit_mb: float | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run ``fn(**kwargs)`` (a module-level function) in a spawned process: ``ok``, ``info`` (its result) or
    ``error``, ``wall_seconds`` (interpreter start-up included) and ``peak_rss_anon_mb`` of its tree; with
    ``pss`` also ``peak_pss_mb``, ``max_processes``, ``sample_interval_s``, ``sampler_cpu_s`` (the CPU
    time the sampling took) and ``peak_time`` (see ``PeakRss``). A tree whose RssAnon passes ``limit_mb`` is killed and the row says so."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    # not daemonic: the quantizer starts its own rounding workers, as it does for a user
    proc = ctx.Process(target=_child, args=(fn, kwargs, child), daemon=False)
    t0 = time.perf_counter()
    proc.start()
    child.close()
    result: dict[str, Any] | None = None
    limit_kb = None if limit_mb is None else int(limit_mb * 1024)
    cpu0 = time.process_time()  # this process only waits: its CPU time is the sampling's
    with PeakRss(proc.pid, pss=pss, limit_kb=limit_kb) as peak:
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
    if peak.exceeded:
        result = {"ok": False, "error": f"stopped: the tree's RssAnon passed the limit of {limit_mb:.0f} MB"}
    elif result is None:
        result = {
            "ok": False,
            "error": f"process ended without a result (exit code {proc.exitcode}, timeout {timeout_s}s)",
        }
    out = {**result, "wall_seconds": wall, "peak_rss_anon_mb": peak.mb}
    if pss:
        out.update(
            peak_pss_mb=peak.pss_kb / 1024.0,
            max_processes=peak.processes,
            sample_interval_s=peak.mean_interval,
            sampler_cpu_s=time.process_time() - cpu0,
            peak_time=peak.peak_time,
            peak_rss_anon_by_process_mb=[kb / 1024.0 for kb in peak.peak_split_kb],
        )
    return out


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
