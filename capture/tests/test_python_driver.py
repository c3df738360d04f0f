"""The python driver end to end against the STUB coreai.runtime (tests/stub_coreai)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import optional_safetensors, asset_of, cc, load_capture, make_bundle, make_plan, run_tool, stub_rt

PLAN = [[17, 5, 300, 42, 383], [7], [17, 5, 300, 42, 383], [1, 2, 3, 4, 5, 6, 7, 8]]


def capture(bundle: Path, plan: Path, out: Path, *extra, env=None):
    r = run_tool(["--bundle", bundle, "--plan", plan, "--out", out, *extra], env=env)
    return r


def test_full_capture_matches_reference_stepping(tmp_path, bundle, plan):
    log = tmp_path / "calls.jsonl"
    out = tmp_path / "out" / "int8hu.capture.safetensors"
    r = capture(bundle, plan, out, "--rollout", "5", env={"STUB_COREAI_LOG": str(log)})
    assert r.returncode == 0, r.stderr
    meta, t = load_capture(out)
    asset = asset_of(bundle)
    for i, toks in enumerate(PLAN):
        rows, gen = stub_rt.reference(asset, toks, rollout=5)
        assert t[f"seq.{i}.tokens"].dtype == np.int64 and t[f"seq.{i}.tokens"].tolist() == toks
        assert t[f"seq.{i}.logits"].dtype == np.float16 and t[f"seq.{i}.logits"].shape == (len(toks), 384)
        assert np.array_equal(t[f"seq.{i}.logits"].view(np.uint16), rows.view(np.uint16)), i
        assert t[f"seq.{i}.rollout"].tolist() == gen
    # sequences 0 and 2 are identical: fresh states per sequence give identical rows
    assert np.array_equal(t["seq.0.logits"], t["seq.2.logits"])
    assert list(out.parent.glob("*.partial")) == []

    events = [json.loads(x) for x in log.read_text().splitlines()]
    loads = [e for e in events if e["event"] == "load"]
    assert len(loads) == 1 and loads[0]["options"] == "cpu_only"  # explicit, parity default
    calls = [e for e in events if e["event"] == "call"]
    # probe call (repeat of the first row), then every plan token and rollout-1 greedy tokens per sequence
    assert len(calls) == 1 + sum(len(s) + 4 for s in PLAN)
    k = 1
    for i, toks in enumerate(PLAN):
        seq_calls = calls[k : k + len(toks) + 4]
        k += len(toks) + 4
        fed = [c["input_ids"] for c in seq_calls]
        assert fed[: len(toks)] == toks and fed[len(toks):] == t[f"seq.{i}.rollout"].tolist()[:4]
        for step, c in enumerate(seq_calls):
            assert c["position_ids"] == list(range(step + 1))  # the full range 0..t every step
        ids = {json.dumps(c["state_ids"]) for c in seq_calls}
        assert len(ids) == 1  # the same state objects within a sequence
    # fresh states per sequence: proven by the identical rows of sequences 0 and 2 above (object ids may be
    # reused by the allocator, so they prove nothing)

    assert meta["format"] == "qgate-capture/1"
    assert meta["label"] == "int8hu" and meta["label_tags"] == ["int8hu"] and meta["label_quantized"] is True
    assert meta["runtime"] == "coreai-python" and meta["driver"] == "python" and meta["compute"] == "cpu"
    assert meta["dtype"] == "f16" and meta["vocab_size"] == 384 and meta["storage"] == "full"
    assert meta["rollout"] == 5
    assert meta["bundle"]["name"] == bundle.name
    assert meta["bundle"]["metadata"]["language"]["vocab_size"] == 384
    assert meta["bundle"]["producer"] == "coreai-core 1.0.0b2"
    assert set(meta["bundle"]["asset_sha256"]) == {"metadata.json", "stub_model.json", "weights/weight.bin"}
    assert meta["bundle"]["asset_sha256"]["weights/weight.bin"] == cc.sha256_file(asset_of(bundle) / "weights/weight.bin")
    assert meta["plan"]["sha256"] == cc.sha256_file(plan) and meta["plan"]["sequences"] == 4
    assert meta["function"]["states"]["keyCache"] == {"dtype": "float16", "shape": [1, 1, 1, "?", 8]}
    assert meta["state_len"] == 64  # language.max_context_length
    assert meta["checks"]["first_row_repeat_bit_identical"] is True
    assert meta["checks"]["nonfinite_rows"] == 0
    assert meta["coreai"] is None or isinstance(meta["coreai"], str)
    assert "python" in meta and "date" in meta and "finished" in meta and "os" in meta
    assert meta["calls"] == len(calls)


def test_stub_is_sensitive_to_state_and_position_handling(tmp_path):
    """Guards the tests above: the stub must punish the mistakes they are meant to catch."""
    b = make_bundle(tmp_path)
    cfg = stub_rt.load_config(asset_of(b))
    w = stub_rt.weights(cfg)
    toks = [17, 5, 300, 42]
    good, _ = stub_rt.reference(asset_of(b), toks)
    # position_ids = [t] only (length 1 every step)
    st = stub_rt.fresh_states(cfg, 64)
    wrong_pos = np.stack([stub_rt.step(cfg, w, t, 1, st) for t in toks]).astype(np.float16)
    assert not np.array_equal(good[1:], wrong_pos[1:])
    # states not carried between steps
    wrong_state = np.stack([stub_rt.step(cfg, w, t, i + 1, stub_rt.fresh_states(cfg, 64))
                            for i, t in enumerate(toks)]).astype(np.float16)
    assert not np.array_equal(good[1:], wrong_state[1:])
    # states leaked from a previous sequence
    st = stub_rt.fresh_states(cfg, 64)
    for i, t in enumerate([9, 9]):
        stub_rt.step(cfg, w, t, i + 1, st)
    leaked = np.stack([stub_rt.step(cfg, w, t, i + 1, st) for i, t in enumerate(toks)]).astype(np.float16)
    assert not np.array_equal(good, leaked)


def test_top_k_mode(tmp_path, bundle, plan):
    out = tmp_path / "k.capture.safetensors"
    r = capture(bundle, plan, out, "--top-k", "7", "--rollout", "3")
    assert r.returncode == 0, r.stderr
    meta, t = load_capture(out)
    assert meta["storage"] == "top-k" and meta["top_k"] == 7 and meta["dtype"] == "f16"
    assert "seq.0.logits" not in t
    for i, toks in enumerate(PLAN):
        rows, gen = stub_rt.reference(asset_of(bundle), toks, rollout=3)
        ids, lg = t[f"seq.{i}.top_ids"], t[f"seq.{i}.top_logits"]
        assert ids.shape == (len(toks), 7) and ids.dtype == np.int64 and lg.dtype == np.float32
        for row, rid, rlg in zip(rows.astype(np.float32), ids, lg):
            assert rid.tolist() == np.argsort(-row, kind="stable")[:7].tolist()
            assert rlg.tolist() == row[rid].tolist()
        assert t[f"seq.{i}.rollout"].tolist() == gen


def test_rollout_zero_and_single_token_plan(tmp_path, bundle):
    plan = make_plan(tmp_path / "p.safetensors", [[3]])
    out = tmp_path / "o.capture.safetensors"
    r = capture(bundle, plan, out, "--rollout", "0")
    assert r.returncode == 0, r.stderr
    _, t = load_capture(out)
    assert t["seq.0.rollout"].shape == (0,) and t["seq.0.logits"].shape == (1, 384)
    st = optional_safetensors()
    if st is not None:
        st = st.numpy
        assert st.load_file(str(out))["seq.0.rollout"].shape == (0,)


@pytest.mark.parametrize("compute,label", [("gpu", "preferred:gpu"), ("ane", "preferred:neural_engine"),
                                           ("default", "default"), ("cpu", "cpu_only")])
def test_compute_unit_options_are_explicit(tmp_path, bundle, compute, label):
    plan = make_plan(tmp_path / "p.safetensors", [[3, 4]])
    log = tmp_path / "log.jsonl"
    out = tmp_path / "o.capture.safetensors"
    r = capture(bundle, plan, out, "--compute", compute, "--rollout", "1", env={"STUB_COREAI_LOG": str(log)})
    assert r.returncode == 0, r.stderr
    loads = [json.loads(x) for x in log.read_text().splitlines() if '"load"' in x]
    assert [x["options"] for x in loads] == [label]
    assert load_capture(out)[0]["compute"] == compute


def test_dynamic_input_ids_is_rejected_towards_llm_runner(tmp_path, plan):
    b = make_bundle(tmp_path, dynamic_input_ids=True)
    out = tmp_path / "o.capture.safetensors"
    r = capture(b, plan, out)
    assert r.returncode == 2, r.stderr
    assert "input_ids" in r.stderr and "dynamic" in r.stderr and "--driver llm-runner" in r.stderr
    assert list(tmp_path.glob("*.capture.safetensors*")) == [] and list(tmp_path.glob(".*partial")) == []


def test_stateless_function_is_rejected(tmp_path, plan):
    b = make_bundle(tmp_path, stateless=True)
    r = capture(b, plan, tmp_path / "o.capture.safetensors")
    assert r.returncode == 2 and "no states" in r.stderr


@pytest.mark.parametrize("mode,needle", [
    ("segv", "killed by SIGSEGV"),
    ("abort", "killed by SIGABRT"),
    ("exit", "exited with status 1"),
    ("raise", "simulated runtime error"),
])
def test_runtime_crash_leaves_no_output(tmp_path, plan, mode, needle):
    # crash in the middle of the third sequence (probe 1 + seq0 5+15 + seq1 1+15 = call 37)
    b = make_bundle(tmp_path, crash_after_calls=40, crash_mode=mode)
    out = tmp_path / "out" / "o.capture.safetensors"
    out.parent.mkdir()
    previous = Path(plan).read_bytes()  # a qgate-capture/1 file, as an earlier capture is
    out.write_bytes(previous)  # an earlier good file must survive a failed run untouched
    r = capture(b, plan, out)
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert needle in r.stderr and "discarded" in r.stderr
    assert out.read_bytes() == previous
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.capture.safetensors"]


def test_in_process_runtime_error_leaves_no_output(tmp_path, plan):
    b = make_bundle(tmp_path, crash_after_calls=3, crash_mode="raise")
    out = tmp_path / "o.capture.safetensors"
    r = capture(b, plan, out, "--in-process")
    assert r.returncode == 3 and "runtime failure" in r.stderr
    assert not out.exists() and list(tmp_path.glob(".*partial")) == []


@pytest.mark.parametrize("style", ["camel", "dict"])
def test_descriptor_attribute_variants(tmp_path, plan, style):
    b = make_bundle(tmp_path, descriptor_style=style)
    out = tmp_path / "o.capture.safetensors"
    r = capture(b, plan, out, "--rollout", "2")
    assert r.returncode == 0, r.stderr
    meta, t = load_capture(out)
    rows, _ = stub_rt.reference(asset_of(b), PLAN[3])
    assert np.array_equal(t["seq.3.logits"], rows)
    assert meta["function"]["source"].startswith("coreai.runtime descriptor")


def test_no_descriptor_falls_back_to_coreai_build_inspect_or_contract_file(tmp_path, plan):
    b = make_bundle(tmp_path, descriptor_style="none")
    out = tmp_path / "o.capture.safetensors"
    r = capture(b, plan, out, env={"PATH": "/nonexistent"})
    assert r.returncode == 2 and "--contract" in r.stderr and "descriptor attributes" in r.stderr
    # fake `xcrun coreai-build inspect … --ops --json`
    bindir = tmp_path / "bin"
    bindir.mkdir()
    xcrun = bindir / "xcrun"
    from conftest import STUB
    xcrun.write_text(
        f"#!{sys.executable}\nimport json, sys\nsys.path.insert(0, {str(STUB)!r})\n"
        "from coreai import runtime\n"
        "a = sys.argv[1:]\nassert a[:2] == ['coreai-build', 'inspect'] and '--json' in a, a\n"
        "print(json.dumps(runtime.inspect_json(a[2])))\n"
    )
    xcrun.chmod(0o755)
    r = capture(b, plan, out, "--rollout", "2", env={"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr
    meta, t = load_capture(out)
    assert meta["function"]["source"] == "xcrun coreai-build inspect --ops --json"
    assert np.array_equal(t["seq.0.logits"], stub_rt.reference(asset_of(b), PLAN[0])[0])
    # --contract FILE
    contract = tmp_path / "contract.json"
    contract.write_text(json.dumps({
        "inputs": {"input_ids": {"dtype": "int32", "shape": [1, 1]}, "position_ids": {"dtype": "int32", "shape": [1, "?"]}},
        "outputs": {"logits": {"dtype": "float16", "shape": [1, 1, 384]}},
        "states": {"keyCache": {"dtype": "float16", "shape": [1, 1, 1, "?", 8]},
                   "valueCache": {"dtype": "float16", "shape": [1, 1, 1, "?", 8]},
                   "convState": {"dtype": "float16", "shape": [1, 1, 6, 3]},
                   "recState": {"dtype": "float16", "shape": [1, 1, 1, 4, 4]}},
    }))
    out2 = tmp_path / "o2.capture.safetensors"
    r = capture(b, plan, out2, "--contract", contract, env={"PATH": "/nonexistent"})
    assert r.returncode == 0, r.stderr
    assert np.array_equal(load_capture(out2)[1]["seq.1.logits"], load_capture(out)[1]["seq.1.logits"])


def test_parse_coreai_build_type():
    ti = cc.parse_coreai_build_type("NDArray (Float16, 44 x 1 x 8 x ? x 128)")
    assert ti.dtype == "float16" and ti.shape == [44, 1, 8, None, 128]
    assert cc.parse_coreai_build_type("NDArray (Int32, 1 x 1)").shape == [1, 1]


def test_argmax_only_bundle(tmp_path, plan):
    b = make_bundle(tmp_path, argmax_only=True)
    out = tmp_path / "o.capture.safetensors"
    r = capture(b, plan, out, "--rollout", "4")
    assert r.returncode == 0, r.stderr
    meta, t = load_capture(out)
    assert meta["storage"] == "argmax" and "seq.0.logits" not in t
    for i, toks in enumerate(PLAN):
        rows, gen = stub_rt.reference(asset_of(b), toks, rollout=4)
        assert t[f"seq.{i}.argmax"].tolist() == [int(np.argmax(r.astype(np.float32))) for r in rows]
        assert t[f"seq.{i}.rollout"].tolist() == gen
    r = capture(b, plan, tmp_path / "o2.capture.safetensors", "--full")
    assert r.returncode == 2 and "argmax" in r.stderr


def test_float32_logits_are_stored_as_f32(tmp_path, plan):
    b = make_bundle(tmp_path, logits_dtype="float32")
    out = tmp_path / "o.capture.safetensors"
    assert capture(b, plan, out, "--rollout", "1").returncode == 0
    meta, t = load_capture(out)
    assert meta["dtype"] == "f32" and t["seq.0.logits"].dtype == np.float32
    assert np.array_equal(t["seq.0.logits"], stub_rt.reference(asset_of(b), PLAN[0])[0])


def test_nondeterministic_first_row_is_flagged(tmp_path, plan):
    b = make_bundle(tmp_path, flaky_first_call=True)
    out = tmp_path / "o.capture.safetensors"
    r = capture(b, plan, out, "--rollout", "1")
    assert r.returncode == 0 and "not deterministic" in r.stderr
    meta, _ = load_capture(out)
    assert meta["checks"]["first_row_repeat_bit_identical"] is False


def test_missing_producer_is_warned_and_recorded(tmp_path, plan):
    b = make_bundle(tmp_path, producer=None)
    out = tmp_path / "o.capture.safetensors"
    r = capture(b, plan, out, "--rollout", "1")
    assert r.returncode == 0 and "producer" in r.stderr
    meta, _ = load_capture(out)
    assert meta["bundle"]["producer"] is None and any("producer" in w for w in meta["warnings"])


def test_limits_and_bad_input(tmp_path, bundle):
    long_plan = make_plan(tmp_path / "long.safetensors", [list(range(60))])
    r = capture(bundle, long_plan, tmp_path / "o.capture.safetensors", "--rollout", "16")
    assert r.returncode == 2 and "positions" in r.stderr
    oov = make_plan(tmp_path / "oov.safetensors", [[1, 384]])
    r = capture(bundle, oov, tmp_path / "o.capture.safetensors")
    assert r.returncode == 2 and "[0, 384)" in r.stderr
    r = capture(tmp_path / "missing", oov, tmp_path / "o.capture.safetensors")
    assert r.returncode == 2 and "no such file" in r.stderr
    assert list(tmp_path.glob("*.capture.safetensors")) == []


def test_label_override_and_untagged_name(tmp_path, plan):
    b = make_bundle(tmp_path, name="my_bundle_v2")
    out = tmp_path / "o.capture.safetensors"
    r = capture(b, plan, out, "--rollout", "0")
    assert r.returncode == 0 and "no quantization tag" in r.stderr
    assert load_capture(out)[0]["label"] == "my_bundle_v2"
    r = capture(b, plan, out, "--rollout", "0", "--label", "int4lin-test")
    assert load_capture(out)[0]["label"] == "int4lin-test"


def test_driver_holds_the_model_in_process(tmp_path, monkeypatch):
    """The stub's function only weakly references its model; a driver that dropped the model would fail."""
    import asyncio

    b = make_bundle(tmp_path)
    plan = make_plan(tmp_path / "p.safetensors", [[1, 2, 3]])
    args = cc.parse_args(["--bundle", str(b), "--plan", str(plan), "--out", str(tmp_path / "o.safetensors"),
                          "--rollout", "2"])
    drv = cc.PythonDriver(args, cc.load_bundle(b), cc.read_plan(plan)[0])
    asyncio.run(drv.load())
    gen = asyncio.run(drv.run_sequence(None, 0, np.array([1, 2, 3]), 2))
    assert gen == stub_rt.reference(asset_of(b), [1, 2, 3], rollout=2)[1]
    drv.model = None
    import gc

    gc.collect()
    with pytest.raises(RuntimeError, match="released"):
        asyncio.run(drv.run_sequence(None, 0, np.array([1]), 0))


def test_out_is_checked_before_any_work(tmp_path, bundle, plan):
    """`--out` never replaces what the tool did not write: a user's file, the plan, a file of the bundle, a
    folder; each is refused (exit 2, one line) before the runtime starts, and left as it was."""
    notes = tmp_path / "notes.md"
    notes.write_text("keep me")
    meta = Path(bundle) / "metadata.json"
    before = {p: p.read_bytes() for p in (notes, Path(plan), meta)}
    for out, needle in [
        (notes, "is not a qgate capture"),
        (Path(plan), "is also the --plan"),
        (meta, "is inside the --bundle"),
        (tmp_path, "is a directory"),
        (notes / "x.capture.safetensors", "is not a directory"),
    ]:
        r = capture(bundle, plan, out)
        assert r.returncode == 2, (out, r.stderr)
        assert needle in r.stderr, (out, r.stderr)
        assert "Traceback" not in r.stderr
    for p, b in before.items():
        assert p.read_bytes() == b, p


def test_malformed_bundle_metadata_is_one_line_exit_2(tmp_path, plan):
    """Fields of the wrong JSON type, or a metadata.json that is not UTF-8: one line, exit 2, no traceback."""
    for i, (edit, needle) in enumerate([
        (lambda m: m.update(assets=["main.aimodel"]), "assets: expected a JSON object"),
        (lambda m: m.update(language="qwen"), "language: expected a JSON object"),
        (lambda m: m.setdefault("language", {}).update(function_map=[1]), "function_map: expected a JSON object"),
    ]):
        b = make_bundle(tmp_path / f"b{i}")
        mp = Path(b) / "metadata.json"
        m = json.loads(mp.read_text())
        edit(m)
        mp.write_text(json.dumps(m))
        r = capture(b, plan, tmp_path / f"o{i}.capture.safetensors")
        assert r.returncode == 2, r.stderr
        assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    b = make_bundle(tmp_path / "latin1")
    (Path(b) / "metadata.json").write_bytes(b'{"name": "mod\xe8le"}')
    r = capture(b, plan, tmp_path / "l.capture.safetensors")
    assert r.returncode == 2 and "not UTF-8" in r.stderr and "Traceback" not in r.stderr, r.stderr
