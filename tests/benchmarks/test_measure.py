"""benchmarks/measure.py: peak memory counts the whole process tree; jobs and commands report failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")

# A parent that starts a child holding 200 MB, then prints the child's pid (the quantizer's rounding
# workers are such children).
_TREE = (
    "import subprocess, sys, time\n"
    "p = subprocess.Popen([sys.executable, '-c', 'import sys, time; b = bytearray(200 << 20); "
    'b[::4096] = b"x" * len(b[::4096]); print(flush=True); time.sleep(60)\'], stdout=subprocess.PIPE)\n'
    "p.stdout.readline(); print(p.pid, flush=True); time.sleep(60)\n"
)


def test_peak_memory_counts_the_worker_processes(measure):
    parent = subprocess.Popen([sys.executable, "-c", _TREE], stdout=subprocess.PIPE, start_new_session=True)
    try:
        child = int(parent.stdout.readline())  # the child has touched its 200 MB
        held = measure.rss_anon_kb(child)
        assert held >= 190 << 10
        assert measure.rss_anon_kb(parent.pid) > held  # the parent's own memory and its child's
        with measure.PeakRss(parent.pid, interval=0.01) as peak:
            pass
        assert peak.mb > 190
        # at the peak, by process: the parent first, then the child holding its 200 MB
        assert len(peak.peak_split_kb) == 2 and sum(peak.peak_split_kb) == peak.kb
        assert peak.peak_split_kb[1] >= 190 << 10 > peak.peak_split_kb[0]
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the child too
        parent.wait()
    assert measure.rss_anon_kb(parent.pid) is None  # gone: nothing to count


def test_a_failing_function_is_reported_with_its_error(measure):
    res = measure.run_function(json.loads, timeout_s=60, s="{")  # importable by the spawned process
    assert res["ok"] is False and res["error"].startswith("JSONDecodeError: Expecting property name")
    assert res["wall_seconds"] > 0 and res["peak_rss_anon_mb"] >= 0


def test_a_command_reports_its_last_error_line(measure):
    res = measure.run_command([sys.executable, "-c", "import sys; sys.exit('bad input: x.onnx')"], 60)
    assert res == {**res, "ok": False, "error": "exit code 1: bad input: x.onnx"}
    assert res["wall_seconds"] > 0
