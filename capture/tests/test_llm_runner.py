"""The llm-runner driver (with a fake `llm-runner` on PATH) and the recorded llm-runner sample files."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import optional_safetensors, SAMPLES, STUB, asset_of, cc, load_capture, make_plan, run_tool, stub_rt

PLAN = [[17, 5, 300, 42, 383], [7], [1, 2, 3, 4, 5, 6, 7, 8]]

FAKE = """#!{python}
# FAKE llm-runner for qgate's capture tests: checks the flags the capture tool must pass, evaluates the raw
# tokens with the STUB model of the bundle, and writes the continuation-evaluation JSON with the sample writer.
import json, os, signal, sys
sys.path[:0] = [{stub!r}, {samples!r}]
from coreai import runtime
import make_samples

args = sys.argv[1:]
def opt(name):
    return args[args.index(name) + 1] if name in args else None

log = os.environ.get("FAKE_LLM_RUNNER_LOG")
tokens = json.load(open(opt("--raw-tokens")))["tokens"] if opt("--raw-tokens") else None
if log:
    with open(log, "a") as f:
        f.write(json.dumps({{"argv": args, "chunk": os.environ.get("COREAI_CHUNK_THRESHOLD"), "tokens": tokens}}) + "\\n")
want = {{"--save-logits-length": "full", "--temperature": "0.0", "--warmup": "off",
        "--inference-engine-variant": "coreai-sequential"}}
for k, v in want.items():
    if opt(k) != v:
        print(f"fake llm-runner: {{k}} is {{opt(k)!r}}, the capture tool must pass {{v!r}}", file=sys.stderr)
        sys.exit(64)
if opt("--save-logits") is None or opt("--model") is None or tokens is None:
    sys.exit(64)
if os.environ.get("COREAI_CHUNK_THRESHOLD") != "1":
    print("fake llm-runner: static [1,1] bundle fed a [1,T] chunk", file=sys.stderr)
    sys.exit(65)
crash = os.environ.get("FAKE_LLM_RUNNER_CRASH")
if crash == "segv":
    os.kill(os.getpid(), signal.SIGSEGV)
if crash == "fail":
    print("Error: The operation couldn't be completed.", file=sys.stderr)
    sys.exit(1)
if crash == "nofile":
    sys.exit(0)
if len(tokens) < 2:
    print("Error: Raw token evaluation requires at least 2 tokens", file=sys.stderr)
    sys.exit(1)
model = opt("--model")
meta = json.load(open(os.path.join(model, "metadata.json")))
rows, _ = runtime.reference(os.path.join(model, meta["assets"]["main"]), tokens)
make_samples.write_eval_json(opt("--save-logits"), tokens, rows)
print("done")
"""


@pytest.fixture
def fake_runner(tmp_path: Path) -> Path:
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    exe = bindir / "llm-runner"
    exe.write_text(FAKE.format(python=sys.executable, stub=str(STUB), samples=str(SAMPLES)))
    exe.chmod(0o755)
    return bindir


def run_llm(bundle, plan, out, bindir, *extra, env=None):
    e = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    e.update(env or {})
    e.pop("COREAI_CHUNK_THRESHOLD", None)
    return run_tool(["--driver", "llm-runner", "--bundle", bundle, "--plan", plan, "--out", out, *extra], env=e)


def test_llm_runner_driver_full_matches_python_driver(tmp_path, bundle, fake_runner):
    plan = make_plan(tmp_path / "plan.safetensors", PLAN)
    log = tmp_path / "runner.jsonl"
    out = tmp_path / "lr.capture.safetensors"
    r = run_llm(bundle, plan, out, fake_runner, "--rollout", "3", env={"FAKE_LLM_RUNNER_LOG": str(log)})
    assert r.returncode == 0, r.stderr
    meta, t = load_capture(out)
    for i, toks in enumerate(PLAN):
        rows, gen = stub_rt.reference(asset_of(bundle), toks, rollout=3)
        assert t[f"seq.{i}.tokens"].tolist() == toks
        assert t[f"seq.{i}.logits"].dtype == np.float16 and t[f"seq.{i}.logits"].shape == (len(toks), 384)
        assert np.array_equal(t[f"seq.{i}.logits"].view(np.uint16), rows.view(np.uint16))
        assert t[f"seq.{i}.rollout"].tolist() == gen
    assert meta["runtime"] == "coreai-llm-runner" and meta["driver"] == "llm-runner"
    assert meta["label"] == "int8hu" and meta["dtype"] == "f16" and meta["vocab_size"] == 384
    assert meta["llm_runner"]["env"] == {"COREAI_CHUNK_THRESHOLD": "1"} and meta["llm_runner"]["pad_token"] == 0
    assert meta["checks"]["rollout_prefix_rows_not_bit_identical"] == 0
    runs = [json.loads(x) for x in log.read_text().splitlines()]
    # per sequence: one evaluation of plan + pad, then one per further rollout token
    assert [x["tokens"] for x in runs[:3]] == [PLAN[0] + [0], PLAN[0] + [t["seq.0.rollout"][0], 0],
                                               PLAN[0] + t["seq.0.rollout"][:2].tolist() + [0]]
    assert len(runs) == 3 * len(PLAN) and all(x["chunk"] == "1" for x in runs)
    assert runs[0]["argv"][runs[0]["argv"].index("--model") + 1] == str(bundle)
    # the same capture through the python driver
    out2 = tmp_path / "py.capture.safetensors"
    assert run_tool(["--bundle", bundle, "--plan", plan, "--out", out2, "--rollout", "3"]).returncode == 0
    t2 = load_capture(out2)[1]
    for k in t:
        assert np.array_equal(t[k], t2[k]), k


def test_llm_runner_driver_top_k_and_no_rollout(tmp_path, bundle, fake_runner):
    plan = make_plan(tmp_path / "plan.safetensors", PLAN)
    log = tmp_path / "runner.jsonl"
    out = tmp_path / "lr.capture.safetensors"
    r = run_llm(bundle, plan, out, fake_runner, "--top-k", "4", "--rollout", "0",
                env={"FAKE_LLM_RUNNER_LOG": str(log)})
    assert r.returncode == 0, r.stderr
    meta, t = load_capture(out)
    assert meta["storage"] == "top-k" and len(log.read_text().splitlines()) == len(PLAN)
    for i, toks in enumerate(PLAN):
        rows, _ = stub_rt.reference(asset_of(bundle), toks)
        assert t[f"seq.{i}.top_ids"].tolist() == [np.argsort(-r.astype(np.float32), kind="stable")[:4].tolist() for r in rows]
        assert t[f"seq.{i}.rollout"].shape == (0,)


@pytest.mark.parametrize("mode,needle", [("segv", "llm-runner crashed (killed by SIGSEGV)"),
                                         ("fail", "llm-runner exited with status 1"),
                                         ("nofile", "wrote no")])
def test_llm_runner_failure_leaves_no_output(tmp_path, bundle, fake_runner, mode, needle):
    plan = make_plan(tmp_path / "plan.safetensors", PLAN)
    out = tmp_path / "out" / "lr.capture.safetensors"
    r = run_llm(bundle, plan, out, fake_runner, env={"FAKE_LLM_RUNNER_CRASH": mode})
    assert r.returncode == 3, r.stderr
    assert needle in r.stderr and "discarded" in r.stderr
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_llm_runner_driver_argument_checks(tmp_path, bundle, fake_runner):
    plan = make_plan(tmp_path / "plan.safetensors", PLAN)
    out = tmp_path / "lr.capture.safetensors"
    r = run_llm(bundle, plan, out, fake_runner, "--compute", "gpu")
    assert r.returncode == 2 and "--compute" in r.stderr
    r = run_tool(["--driver", "llm-runner", "--bundle", bundle, "--plan", plan, "--out", out],
                 env={"PATH": "/nonexistent"})
    assert r.returncode == 2 and "llm-runner not found" in r.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ samples

EXPECTED = json.loads((SAMPLES / "expected.json").read_text())


def test_samples_are_what_make_samples_writes():
    import make_samples

    for name, text in make_samples.build().items():
        assert (SAMPLES / name).read_text("utf-8") == text, f"{name} is stale: rerun make_samples.py"


@pytest.mark.parametrize("name", ["raw-full-f16.json", "raw-full-f32-x86.json"])
def test_full_samples_decode_to_expected_rows(name):
    exp = EXPECTED["files"][name]
    ev = cc.read_llm_runner_eval(SAMPLES / name, vocab_size=EXPECTED["vocab_size"])
    assert ev.kind == "full" and ev.row_dtype == exp["row_dtype"]
    assert ev.tokens.tolist() == exp["tokens"]
    assert ev.rows.shape == (exp["rows"], 384)
    dt = "<f2" if exp["row_dtype"] == "f16" else "<f4"
    want = np.asarray(exp["logits"], dtype=np.float64).astype(dt)
    assert np.array_equal(ev.rows.view(np.uint8), want.view(np.uint8))  # bit-exact, -0.0 included
    import hashlib

    assert hashlib.sha256(ev.rows.astype(dt).tobytes()).hexdigest() == exp["logits_sha256"]
    assert [int(np.argmax(r.astype(np.float32))) for r in ev.rows] == exp["argmax"]


def test_f16_sample_edge_values_and_escapes():
    text = (SAMPLES / "raw-full-f16.json").read_text()
    assert "\\/" in text and '" : ' in text and not text.endswith("\n")
    ev = cc.read_llm_runner_eval(SAMPLES / "raw-full-f16.json")  # vocab unknown: f16 assumed
    assert ev.rows.shape[1] == 384
    assert np.signbit(ev.rows[0, 7]) and ev.rows[0, 7] == 0
    assert ev.rows[1, 3] == np.float16(2.0**-24) and ev.rows[2, 42] == 65504


def test_top_k_sample_decodes_to_expected():
    exp = EXPECTED["files"]["raw-top5.json"]
    ev = cc.read_llm_runner_eval(SAMPLES / "raw-top5.json", vocab_size=384)
    assert ev.kind == "top_k" and ev.tokens.tolist() == exp["tokens"]
    assert ev.top_ids.tolist() == exp["top_ids"]
    assert ev.top_logits.dtype == np.float32
    assert ev.top_logits.tolist() == np.asarray(exp["top_logits"], dtype=np.float32).tolist()
    assert ev.top_tokens == exp["top_tokens"]


def test_generation_schema_and_text_mode_are_refused(tmp_path):
    with pytest.raises(cc.CaptureError, match="generation schema"):
        cc.read_llm_runner_eval(SAMPLES / "generation-full.json")
    doc = json.loads((SAMPLES / "raw-top5.json").read_text())
    doc["context_tokens"] = [1, 2]
    doc["continuation_tokens"] = doc["continuation_tokens"][1:]
    doc["positions"] = doc["positions"][1:]
    with pytest.raises(cc.CaptureError, match="context_tokens"):
        cc.read_llm_runner_eval(doc)
    doc = json.loads((SAMPLES / "raw-full-f16.json").read_text())
    doc["positions"][1]["target_token"] = 99
    with pytest.raises(cc.CaptureError, match="target_token"):
        cc.read_llm_runner_eval(doc)
    with pytest.raises(cc.CaptureError, match="vocab_size 500"):
        cc.read_llm_runner_eval(SAMPLES / "raw-full-f16.json", vocab_size=500)


def test_sample_rows_become_a_capture(tmp_path):
    """What the llm-runner driver does with a file: drop the pad token, rows C_0..C_{T-2} cover the plan."""
    exp = EXPECTED["files"]["raw-full-f16.json"]
    ev = cc.read_llm_runner_eval(SAMPLES / "raw-full-f16.json", vocab_size=384)
    plan = [np.asarray(exp["capture_tokens"])]
    out = tmp_path / "s.capture.safetensors"
    rec = cc.Recorder(out, plan, storage="full", vocab=384, row_dtype="F16", k=0, rollout=0,
                      metadata={"format": cc.FORMAT, "label": "sample", "runtime": "coreai-llm-runner",
                                "dtype": "f16", "vocab_size": 384})
    rec.begin(0)
    for r in ev.rows:
        rec.row(r)
    rec.end([])
    rec.finish()
    meta, t0 = load_capture(out)
    assert t0["seq.0.tokens"].tolist() == exp["capture_tokens"] and meta["vocab_size"] == 384
    assert np.array_equal(t0["seq.0.logits"].view(np.uint16), ev.rows.view(np.uint16))
    st = optional_safetensors()
    if st is not None:
        st = st.numpy
        t = st.load_file(str(out))
        assert t["seq.0.tokens"].tolist() == exp["capture_tokens"]
        assert np.array_equal(t["seq.0.logits"].view(np.uint16), ev.rows.view(np.uint16))
