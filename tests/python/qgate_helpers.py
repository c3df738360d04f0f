"""Shared helpers of the Python-side tests of the qgate binary (JUnit schema, the wheel)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "fixtures"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(var: str, what: str) -> str:
    """The value of `var`; skipped locally when unset, a failure under CI (where .ci/run sets it)."""
    v = os.environ.get(var)
    if not v:
        if in_ci():
            pytest.fail(f"{var} is not set: .ci/run sets it to {what}")
        pytest.skip(f"{var} not set ({what}); .ci/run sets it")
    return v


def qgate_bin() -> Path:
    """The qgate binary under test: $QGATE_BIN, else the debug build `cargo test` leaves."""
    p = Path(os.environ.get("QGATE_BIN") or REPO / "target" / "debug" / "qgate")
    if not p.is_file():
        if in_ci() or os.environ.get("QGATE_BIN"):
            pytest.fail(f"qgate binary {p} missing")
        pytest.skip(f"no qgate binary at {p} (build with cargo build, or set QGATE_BIN)")
    return p


def cargo_version() -> str:
    text = (REPO / "Cargo.toml").read_text()
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    assert m, "no version in Cargo.toml"
    return m.group(1)


def clean_env(tmp: Path) -> dict:
    """The environment for a qgate run: a private oracle cache, none of the CI variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("GITHUB_STEP_SUMMARY", "GITHUB_ACTIONS")}
    env["QGATE_ORACLE_CACHE"] = str(tmp / "oracles")
    return env
