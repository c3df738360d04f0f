#!/usr/bin/env python3
"""Write fixtures/captures/stub-coreai.{plan,capture}.safetensors: a plan and the capture that
coreai_capture.py's python driver writes for it against the STUB coreai.runtime (tests/stub_coreai).

    python3 capture/tests/make_stub_fixtures.py

The tensors are deterministic (test_fixtures.py checks them against a fresh run); the provenance metadata
(dates, temp paths, versions) is not. The logits come from the stub's toy model, not from any Qwen model.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE / "stub_coreai")]

import coreai_capture as cc  # noqa: E402
from conftest import make_bundle, make_plan  # noqa: E402

OUT = HERE.parent.parent / "fixtures" / "captures"
PLAN = [[17, 5, 300, 42, 383, 9], [7, 7, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
ROLLOUT = 4
BUNDLE = "qwen3_5_stub_decode_int8hu"
LABEL = "stub-coreai"


def write(out_dir: Path, tmp: Path) -> tuple[Path, Path]:
    bundle = make_bundle(tmp, BUNDLE)
    plan = make_plan(out_dir / "stub-coreai.plan.safetensors", PLAN, label="stub-coreai-plan")
    cap = out_dir / "stub-coreai.capture.safetensors"
    args = cc.parse_args(["--bundle", str(bundle), "--plan", str(plan), "--out", str(cap),
                          "--rollout", str(ROLLOUT), "--label", LABEL, "--in-process"])
    cc.run_capture(args)
    return plan, cap


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as t:
        for p in write(OUT, Path(t)):
            print(f"wrote {p}")
