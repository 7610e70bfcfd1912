"""Packaging: the wheel holds exactly the one import root plus the optimum-cli hook, and works on its own.

The wheel is built from ``git archive HEAD`` (the committed state; the checkout stays clean), installed with
``pip install --no-deps --target``, and run with a Python that sees that folder and the venv's
site-packages but *not* our editable install (its import hook comes from a ``.pth`` file, which
``python -S`` + a plain ``sys.path`` entry never processes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# repository folder -> where its files land in the wheel
FOLDER_MAP = {
    "plugin": "optimum/adaround",
    "graph_passes": "optimum/adaround/graph_passes",
    "custom_ops/python": "optimum/adaround/custom_ops",
    "optimum_cli_register": "optimum/commands/register",
}


def tracked_files() -> list[str]:
    res = subprocess.run(
        ["git", "ls-tree", "-r", "-z", "--name-only", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [f for f in res.stdout.split("\0") if f]


def expected_modules(files: list[str]) -> set[str]:
    out = set()
    for f in files:
        if not f.endswith(".py"):
            continue
        for folder, target in sorted(FOLDER_MAP.items(), key=lambda kv: -len(kv[0])):
            if f.startswith(folder + "/"):
                out.add(target + f[len(folder) :])
                break
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    src = tmp_path_factory.mktemp("src")
    archive = subprocess.run(
        ["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    dist = tmp_path_factory.mktemp("dist")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    (whl,) = dist.glob("optimum_adaround-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_file_list(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    py = {n for n in names if n.endswith(".py")}
    missing = expected_modules(tracked_files()) - py
    assert not missing, f"tracked modules left out of the wheel (unlisted package?): {sorted(missing)}"
    assert "optimum/commands/register/adaround_onnx_quant.py" in names
    for must in ("optimum/adaround/__init__.py", "optimum/adaround/export.py", "optimum/adaround/recipes.py",
                 "optimum/adaround/commands/export_onnx_quant.py", "optimum/adaround/custom_ops/__init__.py"):  # fmt: skip
        assert must in names, must
    # PEP 420 namespaces owned by optimum: shipping any of these would shadow optimum's own packages
    for ns in (
        "optimum/__init__.py",
        "optimum/commands/__init__.py",
        "optimum/commands/register/__init__.py",
    ):
        assert ns not in names
    top = {n.split("/")[0] for n in names}
    assert not top & {"plugin", "graph_passes", "custom_ops", "optimum_cli_register", "tests", "examples"}
    assert {t for t in top if not t.endswith(".dist-info")} == {"optimum"}
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert (
        "optimum-adaround = optimum.adaround.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    )


@pytest.mark.slow
def test_installed_wheel_runs_optimum_cli_without_the_editable_install(wheel, tmp_path):
    target = tmp_path / "site"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    code = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = [{str(target)!r}]
        sys.path.append({sysconfig.get_paths()["purelib"]!r})
        sys.path.append({sysconfig.get_paths()["platlib"]!r})
        import optimum.adaround, optimum.commands.register.adaround_onnx_quant as hook
        assert optimum.adaround.__file__.startswith({str(target)!r}), optimum.adaround.__file__
        assert hook.__file__.startswith({str(target)!r}), hook.__file__
        from optimum.commands.optimum_cli import main
        sys.argv = ["optimum-cli", "export", "onnx-quant", "--help"]
        main()
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--weight-bits" in res.stdout and "--opset" in res.stdout and "/work/main/plugin" not in res.stderr


def test_editable_install_optimum_cli_help():
    cli = shutil.which("optimum-cli") or str(Path(sys.executable).with_name("optimum-cli"))
    res = subprocess.run([cli, "export", "onnx-quant", "--help"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "--weight-bits" in res.stdout and "--method" in res.stdout and "--recipe" in res.stdout
