"""fixtures/captures/stub-coreai.*: the capture + plan the Rust side reads and gates with `qgate run`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conftest import optional_safetensors, REPO, cc

CAPS = REPO / "fixtures" / "captures"
REQUIRED = ("format", "label", "runtime", "dtype", "vocab_size")
# Tolerance of the regenerated float tensors (see the test): within FLOAT_ULPS units in the last place of
# their dtype, or, for values near zero where an ulp is tiny, within FLOAT_ABS_REL of the tensor's largest
# magnitude.
FLOAT_ULPS = 2
FLOAT_ABS_REL = 1e-6


def ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance between two float arrays of one dtype in units in the last place: the bit patterns mapped
    onto one monotone integer line (so -0.0 and +0.0 are 0 apart, and the sign crossing is counted)."""
    ints = {2: np.int16, 4: np.int32, 8: np.int64}[a.dtype.itemsize]
    top = np.int64(1) << (8 * a.dtype.itemsize - 1)

    def line(x: np.ndarray) -> np.ndarray:
        i = x.view(ints).astype(np.int64)
        return np.where(i < 0, -top - i, i)

    assert not (np.isnan(a).any() or np.isnan(b).any()), "NaN in a fixture"
    return np.abs(line(a) - line(b))


def beyond_tolerance(committed: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    """Where `fresh` is more than FLOAT_ULPS ulps and more than FLOAT_ABS_REL x max|committed| away."""
    a, b = committed.astype(np.float64), fresh.astype(np.float64)
    near = np.abs(a - b) <= FLOAT_ABS_REL * np.abs(a).max()
    return (ulps(committed, fresh) > FLOAT_ULPS) & ~near


def test_tolerance_allows_rounding_noise_and_catches_real_changes():
    row = np.array([10.5, 1.0, -7.874e-05, 0.0003388], np.float16)
    noisy = row.copy()
    noisy[2], noisy[3] = np.float16(-7.915e-05), np.nextafter(row[3], np.float16(1))  # as seen across numpy releases
    assert not beyond_tolerance(row, noisy).any()
    changed = row.copy()
    changed[1] = np.float16(1.01)  # 10 ulps at 1.0, and 1e-2 absolute
    assert beyond_tolerance(row, changed).tolist() == [False, True, False, False]


def test_ulps_counts_units_in_the_last_place():
    one = np.float16(1.0)
    nxt = np.nextafter(one, np.float16(2.0))
    assert ulps(np.array([one, one]), np.array([one, nxt])).tolist() == [0, 1]
    tiny = np.nextafter(np.float16(0.0), np.float16(1.0))
    assert ulps(np.array([-tiny], np.float16), np.array([tiny], np.float16)).tolist() == [2]
    assert ulps(np.array([-0.0], np.float16), np.array([0.0], np.float16)).tolist() == [0]
    f = np.float32(3.0)
    assert ulps(np.array([f]), np.array([np.nextafter(np.nextafter(f, np.float32(4)), np.float32(4))])).tolist() == [2]


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
    # Regenerate and compare (metadata carries dates and paths, so it may differ). Integer tensors (tokens,
    # rollouts) must be identical. Float tensors are compared with a stated tolerance, not bit for bit: the
    # stub model computes in float32 with numpy, whose summation order (SIMD, BLAS) changes between numpy
    # releases; rounded to f16 that shows as an occasional 1-ulp difference, or a few ulps for a value near
    # zero (seen: -7.874e-05 vs -7.915e-05, 7 ulps, in a row whose largest logit is 10.5). Allowed: at most
    # FLOAT_ULPS ulps, or at most FLOAT_ABS_REL × the tensor's largest magnitude.
    fresh_dir = tmp_path / "out"
    fresh_dir.mkdir()
    _, fresh = msf.write(fresh_dir, tmp_path)
    _, t2 = cc.read_safetensors(fresh)
    assert sorted(t) == sorted(t2)
    for k in t:
        assert t[k].dtype == t2[k].dtype and t[k].shape == t2[k].shape, k
        if np.issubdtype(t[k].dtype, np.floating):
            bad = beyond_tolerance(t[k], t2[k])
            assert not bad.any(), (
                f"{k}: {int(bad.sum())} of {bad.size} values differ by more than {FLOAT_ULPS} ulp and more than "
                f"{FLOAT_ABS_REL} x max|value| (first at {np.argwhere(bad)[0].tolist()}): rerun make_stub_fixtures.py")
        else:
            assert np.array_equal(t[k], t2[k]), f"{k}: rerun make_stub_fixtures.py"
    st = optional_safetensors()
    if st is not None:
        with st.safe_open(str(cap_path), framework="numpy") as f:
            assert json.loads(f.metadata()["qgate.capture"])["label"] == "stub-coreai"
            assert f.get_tensor("seq.2.logits").shape == (9, 384)
