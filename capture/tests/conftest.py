"""Shared helpers for the capture tool's tests. The STUB `coreai` package (tests/stub_coreai) is put on
sys.path / PYTHONPATH here and only here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
CAPTURE = TESTS.parent
REPO = CAPTURE.parent
STUB = TESTS / "stub_coreai"
SAMPLES = REPO / "fixtures" / "llm-runner"
TOOL = CAPTURE / "coreai_capture.py"

for p in (str(CAPTURE), str(STUB), str(SAMPLES)):
    if p not in sys.path:
        sys.path.insert(0, p)

import coreai_capture as cc  # noqa: E402
from coreai import runtime as stub_rt  # noqa: E402

assert getattr(stub_rt, "IS_QGATE_STUB", False), "tests must run against the stub coreai.runtime"

DEFAULT_BUNDLE = "qwen3_5_0_8b_decode_int8hu_block32_sym"


def make_bundle(root: Path, name: str = DEFAULT_BUNDLE, *, producer: str | None = "coreai-core 1.0.0b2",
                metadata: dict | None = None, **cfg) -> Path:
    """A LanguageBundle directory whose asset is a stub model (`stub_model.json` = cfg)."""
    b = root / name
    asset = b / f"{name}.aimodel"
    asset.mkdir(parents=True)
    full = dict(stub_rt.DEFAULTS)
    full.update(cfg)
    (asset / "stub_model.json").write_text(json.dumps(cfg))
    (asset / "weights").mkdir()
    (asset / "weights" / "weight.bin").write_bytes(bytes(range(64)))
    am = {"assetVersion": "2.0", "creationDate": "20260706T220735Z"}
    if producer:
        am["producer"] = producer
    (asset / "metadata.json").write_text(json.dumps(am))
    meta = metadata or {
        "metadata_version": "0.2",
        "kind": "llm",
        "name": name,
        "assets": {"main": f"{name}.aimodel"},
        "language": {
            "tokenizer": "Qwen/Qwen3.5-0.8B",
            "vocab_size": full["vocab"],
            "max_context_length": full["max_ctx"],
            "embedded_tokenizer": True,
            "function_map": {"main": ["main"]},
        },
        "source": {"model_definition": "torch", "hf_model_id": "Qwen/Qwen3.5-0.8B"},
        "compression": None,
        "compilation": {"date": "2026-07-06T22:07:35+00:00", "targets": []},
    }
    (b / "metadata.json").write_text(json.dumps(meta, indent=2))
    return b


def asset_of(bundle: Path) -> Path:
    return bundle / f"{bundle.name}.aimodel"


def make_plan(path: Path, seqs: list[list[int]], dtype=np.int64, label: str = "test-plan") -> Path:
    """A plan: a capture holding only seq.{i}.tokens (dtype/runtime fields are placeholders: no logits)."""
    meta = {"format": "qgate-capture/1", "label": label, "runtime": "qgate-plan", "dtype": "f32",
            "vocab_size": 384}
    return cc.write_capture_file(path, meta, [{"tokens": np.asarray(s, dtype=dtype)} for s in seqs])


def tool_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(STUB)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra or {})
    return env


def run_tool(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          env=tool_env(env), timeout=300)


def optional_safetensors():
    """The `safetensors` package for cross-checks, or None: the tests must pass with numpy + pytest only."""
    try:
        import safetensors
        import safetensors.numpy  # noqa: F401
    except ImportError:
        return None
    return safetensors


def load_capture(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    md, tensors = cc.read_safetensors(path)
    return json.loads(md["qgate.capture"]), tensors


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundles")


@pytest.fixture
def plan(tmp_path: Path) -> Path:
    return make_plan(tmp_path / "plan.safetensors", [[17, 5, 300, 42, 383], [7], [17, 5, 300, 42, 383], [1, 2, 3, 4, 5, 6, 7, 8]])
