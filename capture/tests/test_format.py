"""The numpy safetensors writer/reader, plans, labels, bundle metadata."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import optional_safetensors, cc, make_bundle, make_plan


def test_writer_layout_and_cross_check(tmp_path: Path):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 384)).astype(np.float16)
    meta = {"format": cc.FORMAT, "label": "x", "runtime": "t", "dtype": "f16", "vocab_size": 384}
    out = cc.write_capture_file(tmp_path / "a.capture.safetensors", meta, [
        {"tokens": np.array([1, 2, 3]), "logits": logits, "rollout": np.array([4, 5], dtype=np.int64)},
        {"tokens": np.array([9], dtype=np.int32), "top_ids": np.array([[1, 2]]),
         "top_logits": np.array([[0.5, 0.25]], dtype=np.float32), "rollout": np.zeros(0, dtype=np.int64)},
    ])
    raw = out.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    assert header["seq.0.logits"] == {"dtype": "F16", "shape": [3, 384], "data_offsets": [24, 24 + 3 * 384 * 2]}
    assert header["seq.1.tokens"]["dtype"] == "I32"
    assert json.loads(header["__metadata__"]["qgate.capture"]) == meta
    # contiguous, in declared order, covering the whole data section
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert spans[-1][1] == len(raw) - 8 - n
    md, t = cc.read_safetensors(out)
    assert np.array_equal(t["seq.0.logits"].view(np.uint16), logits.view(np.uint16))
    assert t["seq.1.rollout"].shape == (0,)
    st = optional_safetensors()
    if st is not None:
        st = st.numpy
        ref = st.load_file(str(out))
        assert np.array_equal(ref["seq.0.logits"].view(np.uint16), logits.view(np.uint16))
        assert ref["seq.0.tokens"].dtype == np.int64 and ref["seq.1.tokens"].dtype == np.int32
        assert ref["seq.1.top_logits"].tolist() == [[0.5, 0.25]]


def test_streaming_writer_rewrites_metadata_and_handles_overflow(tmp_path: Path):
    specs = [cc.TensorSpec("seq.0.tokens", "I64", (2,)), cc.TensorSpec("seq.0.logits", "F16", (2, 4))]
    for slack, big in ((65536, 10), (0, 5000)):  # fits the reserved space / outgrows it (file rewritten)
        dest = tmp_path / f"s{slack}.safetensors"
        w = cc.SafetensorsWriter(dest, specs, {"qgate.capture": "{}"}, slack=slack)
        w.write("seq.0.tokens", np.array([1, 2]))
        w.write("seq.0.logits", np.array([1, 2, 3, 4], dtype=np.float16))  # row by row
        w.write("seq.0.logits", np.array([5, 6, 7, 8], dtype=np.float16))
        assert not dest.exists()
        w.finish({"qgate.capture": json.dumps({"x": "y" * big})})
        md, t = cc.read_safetensors(dest)
        assert json.loads(md["qgate.capture"])["x"] == "y" * big
        assert t["seq.0.logits"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
        assert list(tmp_path.glob("*.partial")) == []
        st = optional_safetensors()
        if st is not None:
            st = st.numpy
            assert st.load_file(str(dest))["seq.0.tokens"].tolist() == [1, 2]


def test_writer_refuses_short_or_misordered_data_and_abort_cleans_up(tmp_path: Path):
    specs = [cc.TensorSpec("seq.0.tokens", "I64", (2,)), cc.TensorSpec("seq.0.rollout", "I64", (1,))]
    dest = tmp_path / "x.safetensors"
    w = cc.SafetensorsWriter(dest, specs, {})
    with pytest.raises(ValueError):
        w.write("seq.0.rollout", np.array([1]))
    w.write("seq.0.tokens", np.array([1, 2]))
    with pytest.raises(ValueError):
        w.finish()
    w.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with cc.SafetensorsWriter(dest, specs, {}) as w2:
            w2.write("seq.0.tokens", np.array([1, 2]))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_read_plan_accepts_i32_and_i64_and_rejects_bad_plans(tmp_path: Path):
    p = make_plan(tmp_path / "p32.safetensors", [[1, 2, 3], [4]], dtype=np.int32)
    seqs, meta = cc.read_plan(p)
    assert [s.tolist() for s in seqs] == [[1, 2, 3], [4]] and all(s.dtype == np.int64 for s in seqs)
    assert meta["format"] == "qgate-capture/1"
    p = make_plan(tmp_path / "p64.safetensors", [[5, 6]])
    assert [s.tolist() for s in cc.read_plan(p)[0]] == [[5, 6]]
    # a plan without qgate metadata is still a plan
    w = cc.SafetensorsWriter(tmp_path / "bare.safetensors", [cc.TensorSpec("seq.0.tokens", "I64", (1,))], {}, slack=0)
    w.write("seq.0.tokens", np.array([3]))
    w.finish()
    assert [s.tolist() for s in cc.read_plan(tmp_path / "bare.safetensors")[0]] == [[3]]
    # gaps in sequence indices, float tokens, wrong format
    w = cc.SafetensorsWriter(tmp_path / "gap.safetensors", [cc.TensorSpec("seq.1.tokens", "I64", (1,))], {}, slack=0)
    w.write("seq.1.tokens", np.array([3]))
    w.finish()
    with pytest.raises(cc.CaptureError, match="0..0"):
        cc.read_plan(tmp_path / "gap.safetensors")
    w = cc.SafetensorsWriter(tmp_path / "f.safetensors", [cc.TensorSpec("seq.0.tokens", "F32", (1,))], {}, slack=0)
    w.write("seq.0.tokens", np.array([3.0]))
    w.finish()
    with pytest.raises(cc.CaptureError, match="I64 or I32"):
        cc.read_plan(tmp_path / "f.safetensors")
    bad = cc.write_capture_file(tmp_path / "v2.safetensors", {"format": "qgate-capture/2"}, [{"tokens": np.array([1])}])
    with pytest.raises(cc.CaptureError, match="qgate-capture/2"):
        cc.read_plan(bad)
    (tmp_path / "junk").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(cc.CaptureError, match="not a safetensors"):
        cc.read_plan(tmp_path / "junk")


@pytest.mark.parametrize("name,label", [
    ("qwen3_5_0_8b_decode_int8hu_block32_sym", "int8hu"),
    ("qwen3_5_0_8b_decode_int8hu", "int8hu"),
    ("Qwen3.5-2B-int4lin", "int4lin"),
    ("qwen3_5_2b_decode_int4linsym", "int4linsym"),
    ("qwen3_5_27b_decode_fp16", "fp16"),
    ("qwen3_0_6b_4bit_dynamic", None),
    ("mymodel_int8", "int8"),
    ("model-int80", None),
    ("foo_int8sym_l4", "int8sym"),
    ("/some/dir/qwen_decode_mixed48", "mixed48"),
])
def test_label_from_bundle_name(name, label):
    assert cc.parse_label(name)[0] == label


def test_bundle_metadata_producer_and_aimodelc_fallback(tmp_path: Path):
    b = make_bundle(tmp_path, producer=None)
    bun = cc.load_bundle(b)
    assert bun.vocab_size == 384 and bun.max_context == 64 and bun.function == "main"
    assert bun.producer is None and any("producer" in w for w in bun.warnings)
    # assets.main names X.aimodel but only X.aimodelc exists: the Swift reader's fallback
    asset = b / f"{b.name}.aimodel"
    asset.rename(asset.with_suffix(".aimodelc"))
    assert cc.load_bundle(b).asset.suffix == ".aimodelc"
    with pytest.raises(cc.CaptureError, match="metadata.json"):
        (tmp_path / "nope").mkdir()
        cc.load_bundle(tmp_path / "nope")
    hashes = cc.asset_sha256(asset.with_suffix(".aimodelc"))
    assert sorted(hashes) == ["metadata.json", "stub_model.json", "weights/weight.bin"]
