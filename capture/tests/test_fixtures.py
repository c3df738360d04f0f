"""fixtures/captures/stub-coreai.*: the capture + plan the Rust side reads and gates with `qgate run`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conftest import optional_safetensors, REPO, cc

CAPS = REPO / "fixtures" / "captures"
REQUIRED = ("format", "label", "runtime", "dtype", "vocab_size")


def test_stub_fixture_capture_is_current_and_well_formed(tmp_path: Path):
    import make_stub_fixtures as msf

    plan_path, cap_path = CAPS / "stub-coreai.plan.safetensors", CAPS / "stub-coreai.capture.safetensors"
    plan, pmeta = cc.read_plan(plan_path)
    assert [p.tolist() for p in plan] == msf.PLAN
    assert all(k in pmeta for k in REQUIRED)
    md, t = cc.read_safetensors(cap_path)
    meta = json.loads(md["qgate.capture"])
    assert all(k in meta for k in REQUIRED)
    assert meta["format"] == "qgate-capture/1" and meta["label"] == "stub-coreai" and meta["vocab_size"] == 384
    assert meta["runtime"] == "coreai-python" and meta["dtype"] == "f16"
    assert meta["coreai_module"].endswith("stub_coreai/coreai/__init__.py")  # says what produced it
    for i, toks in enumerate(msf.PLAN):
        assert t[f"seq.{i}.tokens"].tolist() == toks
        assert t[f"seq.{i}.logits"].shape == (len(toks), 384) and t[f"seq.{i}.logits"].dtype == np.float16
        assert t[f"seq.{i}.rollout"].shape == (msf.ROLLOUT,)
        assert t[f"seq.{i}.rollout"][0] == int(np.argmax(t[f"seq.{i}.logits"][-1].astype(np.float32)))
    # regenerate: the tensors must be identical (metadata carries dates and paths, so it may differ)
    fresh_dir = tmp_path / "out"
    fresh_dir.mkdir()
    _, fresh = msf.write(fresh_dir, tmp_path)
    _, t2 = cc.read_safetensors(fresh)
    assert sorted(t) == sorted(t2)
    for k in t:
        assert np.array_equal(t[k].view(np.uint8), t2[k].view(np.uint8)), f"{k}: rerun make_stub_fixtures.py"
    st = optional_safetensors()
    if st is not None:
        with st.safe_open(str(cap_path), framework="numpy") as f:
            assert json.loads(f.metadata()["qgate.capture"])["label"] == "stub-coreai"
            assert f.get_tensor("seq.2.logits").shape == (9, 384)
