"""The benchmark's per-site proxy-loss counting (benchmarks/quality.py is a script, imported by path)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


def test_site_counts_compare_within_each_site(quality):
    sites = [
        {"metrics": {"proxy_loss": 1.0, "proxy_loss_rtn": 2.0, "proxy_loss_init": 1.5}},
        {"metrics": {"proxy_loss": 3.0, "proxy_loss_rtn": 2.0, "proxy_loss_init": 3.0}},  # worse, tie
        {
            "metrics": {
                "proxy_loss": 9.0,
                "proxy_loss_rtn": 2.0,
                "fp_target_loss": 1.0,
                "fp_target_loss_init": 2.0,
            }
        },
        {"metrics": {"proxy_loss": 1.0}},  # rtn itself: nothing to compare
    ]
    assert quality.site_counts(sites) == {
        "below_rtn": 1,
        "below_rtn_of": 3,
        "below_init": 2,
        "below_init_of": 3,
    }
    assert quality.site_counts([]) == {"below_rtn": 0, "below_rtn_of": 0, "below_init": 0, "below_init_of": 0}


def _stopped_run(command: str, complete: bool = False) -> dict:
    rows = [
        {"scheme": "fp32", "tool": "fp32", "method": "fp32", "status": "ok", "perplexity": 27.2},
        {"scheme": "w4-g128", "tool": "ours", "method": "gptq", "status": "ok", "perplexity": 30.9},
        {"scheme": "w4-g128", "tool": "ours", "method": "adaround", "status": "ok", "perplexity": None},
        {
            "scheme": "w4-g128",
            "tool": "onnxruntime",
            "method": "kquant",
            "status": "error",
            "perplexity": None,
        },
        {"scheme": "w3-g128", "tool": "onnxruntime", "method": "rtn", "status": "n/a", "perplexity": None},
        {
            "scheme": "w3-g128",
            "tool": "ours",
            "method": "adaround_ls",
            "status": "not reached",
            "perplexity": None,
        },
    ]
    return {"meta": {"command": command, "complete": complete}, "rows": rows}


def test_resume_takes_over_measured_and_inapplicable_rows_only(quality):
    command = "python benchmarks/quality.py --eval-tokens 16384"
    rows = quality.finished_rows(_stopped_run(command), command)
    assert sorted(rows) == [
        ("fp32", "fp32", "fp32"),
        ("w3-g128", "onnxruntime", "rtn"),
        ("w4-g128", "ours", "gptq"),
    ]
    assert rows[("w4-g128", "ours", "gptq")]["perplexity"] == 30.9


def test_resume_refuses_another_command_or_a_finished_run(quality):
    command = "python benchmarks/quality.py --eval-tokens 16384"
    with pytest.raises(ValueError, match="another command"):
        quality.finished_rows(_stopped_run(command), command + " --quick")
    with pytest.raises(ValueError, match="finished run"):
        quality.finished_rows(_stopped_run(command, complete=True), command)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_peak_memory_counts_the_worker_processes(quality):
    # the quantizer rounds in worker processes: a child holding 200 MB must count for its parent
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import sys, time; b = bytearray(200 << 20); "
        'b[::4096] = b"x" * len(b[::4096]); print(flush=True); time.sleep(60)\'], stdout=subprocess.PIPE)\n'
        "p.stdout.readline(); print(flush=True); time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    try:
        parent.stdout.readline()  # the grandchild has touched its 200 MB
        alone = int(
            next(
                ln
                for ln in Path(f"/proc/{parent.pid}/status").read_text().splitlines()
                if ln.startswith("RssAnon")
            ).split()[1]
        )
        assert alone < 100 << 10
        assert quality._rss_anon_kb(parent.pid) >= alone + (190 << 10)
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the grandchild too
        parent.wait()
    assert quality._rss_anon_kb(parent.pid) is None  # gone: nothing to count
