"""STUB `coreai.runtime` for qgate's capture tests. NOT Apple's runtime; it runs no Core AI graph.

It mimics the API surface `capture/coreai_capture.py` uses (coreai_formats.md §4.2):
`SpecializationOptions.cpu_only()/default()/from_preferred_compute_unit_kind(kind)`, `ComputeUnitKind`,
`await AIModel.load(path, options)`, `model.function_names`, `model.load_function(name)`, `fn.desc`,
`await fn(inputs={…}, state={…})` returning `{name: NDArray}`, and `NDArray(ndarray).numpy()`.

The "graph" is a tiny deterministic numpy model that has the Qwen3.5 S=1 decode contract (§4.1): static
`input_ids` int32 [1,1], `position_ids` int32 [1,P] whose offset is taken as P-1 (the graph's `P - query_len`),
fp16 logits [1,1,V], and four fp16 states `keyCache`/`valueCache` [1,1,1,S,8] (S dynamic), `convState`
[1,1,6,3], `recState` [1,1,1,4,4], mutated in place. The output depends on every earlier token through all
four states and on the position, so wrong state handling or wrong position ids change the logits.

The asset is a directory holding `stub_model.json` (config, see DEFAULTS) — so that a test can describe a
bundle whose contract differs, or a runtime that crashes. Which Python attribute names the real
`InferenceFunctionDescriptor` uses is unknown; `descriptor_style` selects one of several guesses (or none).
Env `STUB_COREAI_LOG=FILE` appends one JSON line per load and per call.
"""
from __future__ import annotations

import json
import os
import signal
import weakref
from pathlib import Path
from typing import Any

import numpy as np

IS_QGATE_STUB = True

DEFAULTS: dict[str, Any] = {
    "vocab": 384,
    "d": 16,
    "seed": 0,
    "max_ctx": 64,
    "head_dim": 8,
    "conv_dim": 6,
    "kernel": 4,
    "dk": 4,
    "dv": 4,
    "logits_dtype": "float16",
    "descriptor_style": "snake",  # snake | camel | dict | none
    "dynamic_input_ids": False,
    "argmax_only": False,
    "stateless": False,
    "function_names": ["main"],
    "crash_after_calls": None,  # crash on this call number (1-based) of the process
    "crash_mode": "segv",  # segv | abort | raise | exit
    "flaky_first_call": False,  # perturb the very first call's logits (non-deterministic runtime)
}

_CALLS = 0


def _log(rec: dict) -> None:
    p = os.environ.get("STUB_COREAI_LOG")
    if p:
        with open(p, "a") as f:
            f.write(json.dumps(rec) + "\n")


# ------------------------------------------------------------------------------------------------ options


class ComputeUnitKind:
    def __init__(self, name: str):
        self.name = name

    @staticmethod
    def cpu() -> "ComputeUnitKind":
        return ComputeUnitKind("cpu")

    @staticmethod
    def gpu() -> "ComputeUnitKind":
        return ComputeUnitKind("gpu")

    @staticmethod
    def neural_engine() -> "ComputeUnitKind":
        return ComputeUnitKind("neural_engine")


class SpecializationOptions:
    def __init__(self, label: str):
        self.label = label

    @staticmethod
    def cpu_only() -> "SpecializationOptions":
        return SpecializationOptions("cpu_only")

    @staticmethod
    def default() -> "SpecializationOptions":
        return SpecializationOptions("default")

    @staticmethod
    def from_preferred_compute_unit_kind(kind: ComputeUnitKind) -> "SpecializationOptions":
        if not isinstance(kind, ComputeUnitKind):
            raise TypeError("expected a ComputeUnitKind")
        return SpecializationOptions(f"preferred:{kind.name}")


# ------------------------------------------------------------------------------------------------ NDArray


class NDArray:
    def __init__(self, data: Any, backing: Any = None):
        if isinstance(data, NDArray):
            data = data._a
        if not isinstance(data, (np.ndarray, list)):
            raise TypeError(f"NDArray: unsupported data {type(data)}")
        self._a = np.array(data, copy=True, order="C")

    @property
    def dtype(self) -> str:
        return self._a.dtype.name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._a.shape)

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(self._a.strides)

    def numpy(self) -> np.ndarray:
        return self._a


# ------------------------------------------------------------------------------------------------ model


def load_config(asset: str | os.PathLike) -> dict[str, Any]:
    p = Path(asset) / "stub_model.json"
    cfg = dict(DEFAULTS)
    cfg.update(json.loads(p.read_text()))
    return cfg


def weights(cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(cfg["seed"])
    d, v, hd, c, k, dk, dv = (cfg[x] for x in ("d", "vocab", "head_dim", "conv_dim", "kernel", "dk", "dv"))

    def m(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale / np.sqrt(shape[-1])).astype(np.float32)

    return {
        "E": m(v, d, scale=np.sqrt(d)),
        "freqs": (1.0 / (10.0 ** (np.arange(d) / d))).astype(np.float32),
        "Wc": m(c, d), "Kc": m(c, k, scale=1.5),
        "Wk2": m(dk, c), "Wv2": m(dv, c), "Wq2": m(dk, d),
        "Wk": m(hd, d), "Wv": m(hd, d), "Wq": m(hd, d, scale=3.0),
        "Wr": m(d, dv), "Wo": m(d, hd), "Wy": m(d, c),
        "U": m(v, d, scale=4.0),
    }


def state_specs(cfg: dict[str, Any]) -> dict[str, tuple[str, tuple]]:
    """name -> (dtype, shape with None for the dynamic KV sequence dimension)."""
    if cfg["stateless"]:
        return {}
    hd, c, k, dk, dv = (cfg[x] for x in ("head_dim", "conv_dim", "kernel", "dk", "dv"))
    return {
        "keyCache": ("float16", (1, 1, 1, None, hd)),
        "valueCache": ("float16", (1, 1, 1, None, hd)),
        "convState": ("float16", (1, 1, c, k - 1)),
        "recState": ("float16", (1, 1, 1, dk, dv)),
    }


def step(cfg: dict[str, Any], w: dict[str, np.ndarray], token: int, p: int, st: dict[str, np.ndarray]) -> np.ndarray:
    """One decode step: `token` at offset p-1 (p = len(position_ids)). Mutates the fp16 states `st` in place
    and returns the f32 logits [V]."""
    off = p - 1
    x = w["E"][token] + np.sin(off * w["freqs"] + 0.3).astype(np.float32)
    if cfg["stateless"]:
        h = np.tanh(x)
        return (w["U"] @ h).astype(np.float32)
    conv = st["convState"][0, 0].astype(np.float32)
    win = np.concatenate([conv, (w["Wc"] @ x)[:, None]], axis=1)
    y = np.tanh(np.sum(win * w["Kc"], axis=1))
    st["convState"][0, 0] = win[:, 1:].astype(np.float16)
    s = st["recState"][0, 0, 0].astype(np.float32)
    s = 0.8 * s + np.outer(np.tanh(w["Wk2"] @ y), w["Wv2"] @ y)
    st["recState"][0, 0, 0] = s.astype(np.float16)
    r = s.astype(np.float16).astype(np.float32).T @ (w["Wq2"] @ x)
    kc, vc = st["keyCache"][0, 0, 0], st["valueCache"][0, 0, 0]
    kc[off] = (w["Wk"] @ x).astype(np.float16)
    vc[off] = (w["Wv"] @ x).astype(np.float16)
    sc = kc[: off + 1].astype(np.float32) @ (w["Wq"] @ x) / np.sqrt(cfg["head_dim"])
    a = np.exp(sc - sc.max())
    a /= a.sum()
    o = a @ vc[: off + 1].astype(np.float32)
    h = np.tanh(x + w["Wr"] @ r + w["Wo"] @ o + w["Wy"] @ y)
    return (w["U"] @ h).astype(np.float32)


def fresh_states(cfg: dict[str, Any], seq_len: int) -> dict[str, np.ndarray]:
    return {
        n: np.zeros(tuple(seq_len if d is None else d for d in shape), dtype=dt)
        for n, (dt, shape) in state_specs(cfg).items()
    }


def reference(asset: str | os.PathLike, tokens, rollout: int = 0) -> tuple[np.ndarray, list[int]]:
    """What a correct S=1 capture of this stub yields: rows [T, V] in the output dtype (row t after
    tokens[0..=t], fresh states, position_ids 0..t) and the greedy rollout (lowest id on ties)."""
    cfg = load_config(asset)
    w = weights(cfg)
    st = fresh_states(cfg, cfg["max_ctx"])
    dt = np.dtype(cfg["logits_dtype"])
    rows = [step(cfg, w, int(t), i + 1, st).astype(dt) for i, t in enumerate(tokens)]
    gen: list[int] = []
    last = rows[-1]
    pos = len(tokens)
    while len(gen) < rollout:
        gen.append(int(np.argmax(last.astype(np.float32))))
        if len(gen) == rollout:
            break
        pos += 1
        last = step(cfg, w, gen[-1], pos, st).astype(dt)
    return np.stack(rows), gen


def inspect_json(asset: str | os.PathLike) -> dict:
    """What `xcrun coreai-build inspect <asset> --ops --json` would print for this stub (§3.3 shape)."""
    cfg = load_config(asset)

    def ty(dt: str, shape) -> str:
        name = {"float16": "Float16", "float32": "Float32", "int32": "Int32"}[dt]
        return f"NDArray ({name}, {' x '.join('?' if d is None else str(d) for d in shape)})"

    ins, outs, sts = _contract(cfg)
    fn = {
        "name": "main",
        "inputs": [{"name": n, "type": ty(*v)} for n, v in ins.items()],
        "outputs": [{"name": n, "type": ty(*v)} for n, v in outs.items()],
        "states": [{"name": n, "type": ty(*v)} for n, v in sts.items()],
    }
    return {"summary": {"functions": [fn], "operationDistribution": [{"name": "stub", "count": 1}]}}


def _contract(cfg):
    ids_shape = (1, None) if cfg["dynamic_input_ids"] else (1, 1)
    ins = {"input_ids": ("int32", ids_shape), "position_ids": ("int32", (1, None))}
    if cfg["argmax_only"]:
        outs = {"next_token": ("int32", (1, 1))}
    else:
        outs = {"logits": (cfg["logits_dtype"], (1, 1, cfg["vocab"]))}
    return ins, outs, state_specs(cfg)


# ------------------------------------------------------------------------------------------------ API


class TensorDescriptor:
    def __init__(self, name: str, dtype: str, shape: tuple):
        self.name = name
        self.dtype = dtype
        self.shape = shape

    def __repr__(self) -> str:
        return f"TensorDescriptor({self.name!r}, {self.dtype}, {self.shape})"


class _CamelTensorDescriptor:
    def __init__(self, name: str, dtype: str, shape: tuple):
        self.name = name
        self.dataType = {"float16": "Float16", "float32": "Float32", "int32": "Int32"}[dtype]
        self.shape = [(-1 if d is None else d) for d in shape]


class InferenceFunctionDescriptor:
    def __init__(self, name: str, cfg: dict):
        self.name = name
        ins, outs, sts = _contract(cfg)
        style = cfg["descriptor_style"]
        self._style = style
        if style == "snake":
            self._groups = {
                k: {n: TensorDescriptor(n, *v) for n, v in g.items()}
                for k, g in (("input", ins), ("output", outs), ("state", sts))
            }
        elif style == "camel":
            self._groups = {
                k: {n: _CamelTensorDescriptor(n, *v) for n, v in g.items()}
                for k, g in (("input", ins), ("output", outs), ("state", sts))
            }
            self.inputNames = list(ins)
            self.outputNames = list(outs)
            self.stateNames = list(sts)
        elif style == "dict":
            self.inputs = {n: TensorDescriptor(n, *v) for n, v in ins.items()}
            self.outputs = {n: TensorDescriptor(n, *v) for n, v in outs.items()}
            self.states = {n: TensorDescriptor(n, *v) for n, v in sts.items()}
        elif style != "none":
            raise ValueError(style)

    def __getattr__(self, a: str):
        style = self.__dict__.get("_style")
        if style == "snake":
            for k in ("input", "output", "state"):
                if a == f"{k}_names":
                    return list(self._groups[k])
                if a == f"{k}_descriptor":
                    return lambda n, k=k: self._groups[k][n]
        if style == "camel":
            for k in ("input", "output", "state"):
                if a == f"{k}Descriptor":
                    return lambda n, k=k: self._groups[k][n]
        raise AttributeError(a)

    def __repr__(self) -> str:
        return f"InferenceFunctionDescriptor({self.name!r})"


class InferenceFunction:
    def __init__(self, model: "AIModel", name: str):
        # Only a weak reference, like a function handle whose model must be kept alive by the caller:
        # the capture tool must hold the AIModel for the whole run.
        self._model_ref = weakref.ref(model)
        self._cfg, self._w = model._cfg, model._w
        self.name = name
        self.desc = InferenceFunctionDescriptor(name, model._cfg)

    async def __call__(self, inputs: dict | None = None, state: dict | None = None) -> dict:
        global _CALLS
        _CALLS += 1
        cfg, w = self._cfg, self._w
        if self._model_ref() is None:
            raise RuntimeError("stub: the AIModel was released while its function is still in use")
        if cfg["crash_after_calls"] is not None and _CALLS >= cfg["crash_after_calls"]:
            mode = cfg["crash_mode"]
            if mode == "segv":
                os.kill(os.getpid(), signal.SIGSEGV)
            elif mode == "abort":
                os.abort()
            elif mode == "exit":
                os._exit(1)
            raise RuntimeError("stub: simulated runtime error")
        ins, outs, sts = _contract(cfg)
        inputs = inputs or {}
        state = state or {}
        if set(inputs) != set(ins):
            raise ValueError(f"stub: inputs {sorted(inputs)} != {sorted(ins)}")
        for n, v in list(inputs.items()) + list(state.items()):
            if not isinstance(v, NDArray):
                raise TypeError(f"stub: {n} must be an NDArray, got {type(v)}")
        ids, pos = inputs["input_ids"].numpy(), inputs["position_ids"].numpy()
        if ids.dtype != np.int32 or pos.dtype != np.int32:
            raise TypeError(f"stub: input_ids/position_ids must be int32, got {ids.dtype}/{pos.dtype}")
        if ids.shape != (1, 1):
            raise ValueError(f"stub: input_ids shape {ids.shape} (this stub steps one token)")
        if pos.ndim != 2 or pos.shape[0] != 1 or not 1 <= pos.shape[1] <= cfg["max_ctx"] - 1:
            raise ValueError(f"stub: position_ids shape {pos.shape}")
        if set(state) != set(sts):
            raise ValueError(f"stub: states {sorted(state)} != {sorted(sts)}")
        arrays = {}
        p = pos.shape[1]
        for n, (dt, shape) in sts.items():
            a = state[n].numpy()
            if a.dtype != np.dtype(dt) or a.ndim != len(shape):
                raise TypeError(f"stub: state {n} is {a.dtype}{a.shape}, declared {dt}{shape}")
            for got, want in zip(a.shape, shape):
                if want is None:
                    if not p <= got <= cfg["max_ctx"]:
                        raise ValueError(f"stub: state {n} dynamic dim {got} outside [{p}, {cfg['max_ctx']}]")
                elif got != want:
                    raise ValueError(f"stub: state {n} shape {a.shape}, declared {shape}")
            arrays[n] = a  # mutated in place, like the real states
        _log({"event": "call", "n": _CALLS, "input_ids": int(ids[0, 0]), "position_ids": pos[0].tolist(),
              "state_ids": {n: id(state[n]) for n in sorted(state)}})
        logits = step(cfg, w, int(ids[0, 0]), p, arrays)
        if cfg["flaky_first_call"] and _CALLS == 1:
            logits = logits + np.float32(0.01)
        if cfg["argmax_only"]:
            out = np.array([[int(np.argmax(logits.astype(np.dtype(cfg["logits_dtype"])).astype(np.float32)))]],
                           dtype=np.int32)
            return {"next_token": NDArray(out)}
        return {"logits": NDArray(logits.astype(np.dtype(cfg["logits_dtype"])).reshape(1, 1, -1))}


class AIModel:
    def __init__(self, path: Path, options: SpecializationOptions):
        self.path = path
        self.options = options
        self._cfg = load_config(path)
        self._w = weights(self._cfg)
        self.function_names = list(self._cfg["function_names"])

    @staticmethod
    async def load(path: str | os.PathLike, options: SpecializationOptions | None = None) -> "AIModel":
        if not isinstance(options, SpecializationOptions):
            raise TypeError("stub: pass explicit SpecializationOptions (qgate's rule: never None)")
        p = Path(path)
        if not (p / "stub_model.json").is_file():
            raise FileNotFoundError(f"stub: {p} is not a stub asset")
        _log({"event": "load", "path": str(p), "options": options.label})
        return AIModel(p, options)

    def load_function(self, name: str, profiler: Any = None) -> InferenceFunction:
        if name not in self.function_names:
            raise KeyError(name)
        return InferenceFunction(self, name)
