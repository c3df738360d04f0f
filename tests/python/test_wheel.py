"""`pip install qgate` as a user gets it: the wheel `.ci/run` builds with maturin ($QGATE_WHEEL), installed
into a fresh virtual environment, runs `qgate --version`, the README's main command and `qgate-capture`.
Slow (a venv and a pip install); .ci/run runs it, a plain local pytest run skips it unless QGATE_WHEEL is set."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from qgate_helpers import REPO, cargo_version, clean_env, need


def readme_main_command() -> list[str]:
    """The README's main command (the first `cargo run --release -- run` block), as arguments after `qgate`."""
    text = (REPO / "README.md").read_text()
    m = re.search(r"```sh\n(cargo run --release -- run .*?)\n```", text, re.S)
    assert m, "README has no `cargo run --release -- run` block"
    args = shlex.split(m.group(1).replace("\\\n", " "))
    assert args[:4] == ["cargo", "run", "--release", "--"]
    return args[4:]


def numpy_pin() -> str:
    m = re.search(r"^numpy==(\S+)", (REPO / ".ci" / "requirements.txt").read_text(), re.M)
    assert m
    return f"numpy=={m.group(1)}"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    wheel = Path(need("QGATE_WHEEL", "the wheel maturin built"))
    assert wheel.is_file() and wheel.suffix == ".whl", wheel
    env_dir = tmp_path_factory.mktemp("wheel") / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    py = env_dir / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel),
                        numpy_pin()], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return env_dir


def test_version(fresh: Path):
    r = subprocess.run([str(fresh / "bin" / "qgate"), "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"qgate {cargo_version()}", r.stdout + r.stderr
    r = subprocess.run([str(fresh / "bin" / "python"), "-m", "qgate", "--version"], capture_output=True, text=True)
    assert r.stdout.strip() == f"qgate {cargo_version()}", r.stdout + r.stderr


def test_readme_main_command(fresh: Path, tmp_path: Path):
    args = readme_main_command()
    out = tmp_path / "demo"
    i = args.index("--out")
    args[i + 1] = str(out)
    assert args[0] == "run" and "--oracle" in args
    r = subprocess.run([str(fresh / "bin" / "qgate"), *args, "--junit", str(tmp_path / "junit.xml")], cwd=REPO,
                       capture_output=True, text=True, env=clean_env(tmp_path), timeout=900)
    # exits 0 (pass) or 1 (gate failed): a verdict, not an error
    assert r.returncode in (0, 1), r.stdout + r.stderr
    for f in ("report.md", "positions.csv", "summary.json", "positions.svg"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    assert summary["schema"] == "qgate-report/1" and summary["exit_code"] == r.returncode
    assert summary["verdict"] in r.stdout
    # the demo's candidates carry their bundle sizes: the ship decision is by size, never argument order
    gated = [c for c in summary["candidates"] if c["role"] == "candidate"]
    assert gated and all(isinstance(c["size_bytes"], int) for c in gated), gated
    assert list((tmp_path / "oracles").glob("*.capture.safetensors")), "the oracle run was cached"
    assert (tmp_path / "junit.xml").is_file()


def test_capture_tool_is_installed(fresh: Path):
    installed = list((fresh / "lib").glob("python3*/site-packages/qgate/coreai_capture.py"))
    assert len(installed) == 1
    assert installed[0].read_bytes() == (REPO / "capture" / "coreai_capture.py").read_bytes()
    r = subprocess.run([str(fresh / "bin" / "qgate-capture"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "--bundle" in r.stdout and "--plan" in r.stdout
    # a missing plan: the tool's own error and exit code, not a traceback
    r = subprocess.run([str(fresh / "bin" / "qgate-capture"), "--bundle", "nope", "--plan", "nope.safetensors",
                        "--out", "x.safetensors"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "error" in r.stderr, r.stderr


if sys.platform == "win32":  # the venv layout above is the POSIX one
    pytestmark = pytest.mark.skip("POSIX venv layout")
