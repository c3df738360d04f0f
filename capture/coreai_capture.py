#!/usr/bin/env python3
"""Capture what a converted Core AI bundle computes, as a `qgate-capture/1` file.

Run on a Mac with Apple's Core AI runtime (Python package `coreai`, or the `llm-runner` tool)::

    python3 coreai_capture.py --bundle DIR --plan PLAN.safetensors --out NAME.capture.safetensors \
        [--compute cpu|gpu|ane|default] [--driver python|llm-runner] [--rollout N] [--top-k K | --full]

Two drivers:

* ``python`` (default): loads the bundle's asset with ``coreai.runtime``, allocates the states the function
  declares (zeros, fresh per sequence) and feeds the plan one token per call with ``input_ids`` int32 ``[1,1]``
  and ``position_ids`` int32 ``[1, t+1]`` = ``0..t``. Row t of the capture is the ``logits`` output of step t,
  i.e. the logits after ``tokens[0..=t]``. For static-logits S=1 decode bundles (the zoo's ``*_decode_*``
  Qwen3.5 bundles). The runtime runs in a child process of this script (one process for the whole run), so a
  crash of the runtime is reported as a crash and the partial capture is discarded.
* ``llm-runner``: runs Apple's ``llm-runner`` raw-token evaluation with ``--save-logits`` and converts its
  JSON (continuation-evaluation schema). For bundles whose engine exposes logits.

Dependencies: Python >= 3.11, numpy, and (python driver only) ``coreai``. The capture format is written by
the small safetensors writer below; no ``safetensors`` package is needed.

Status: exercised against a stub ``coreai.runtime`` and a fake ``llm-runner`` only (see ``tests/``). Points
that need a first real run on macOS 27 are marked UNCONFIRMED in comments below and listed in README.md.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as _dt
import hashlib
import importlib
import inspect
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TOOL_NAME = "coreai_capture.py"
TOOL_VERSION = "0.1.0"
FORMAT = "qgate-capture/1"
META_KEY = "qgate.capture"

EXIT_OK = 0
EXIT_USAGE = 2  # bad arguments, bad plan, bundle contract differs
EXIT_RUNTIME = 3  # the runtime (or llm-runner) failed or crashed; nothing written

# The Qwen3.5 S=1 decode contract (coreai_formats.md §4.1). Only used for messages and as the expected
# names when no descriptor information is available at all; shapes always come from the bundle.
QWEN35_DECODE_STATES = ("keyCache", "valueCache", "convState", "recState")

# Bundle-name -> quantization mode (zoo `conversion/zoo_verify.py` L62-66, verbatim; coreai_formats.md §3.4).
PRECISION = re.compile(
    r"(?<![a-z0-9])(int2|int4km|int4lin(?:sym)?|int4hu|int4|int8hu|int8lin|int8sym|int8|"
    r"mixed48|mixedbit|sym8|fp4|fp8|fp16|float16|bf16|bfloat16|float32|fp32)(?![a-z0-9])"
)
QUANTIZED = ("int", "sym", "fp4", "fp8", "mixed")

# The Core AI runtime leaks an IOSurface per call; the zoo caps a process at 14 000 calls (coreai_formats.md §4.2).
ZOO_CALL_CAP = 14_000


class CaptureError(Exception):
    """A problem the user can fix (arguments, plan, bundle contract). Exit status 2."""

    exit_code = EXIT_USAGE


class RuntimeFailure(CaptureError):
    """The runtime or llm-runner failed. Exit status 3; the partial capture is discarded."""

    exit_code = EXIT_RUNTIME


def warn(msg: str) -> None:
    print(f"coreai_capture: warning: {msg}", file=sys.stderr, flush=True)


def info(msg: str) -> None:
    print(f"coreai_capture: {msg}", file=sys.stderr, flush=True)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# ================================================================================================
# safetensors, numpy only
# ================================================================================================

_ST_DTYPES: dict[str, np.dtype] = {
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BF16": np.dtype("<u2"),  # raw bits; widened on read
    "BOOL": np.dtype("?"),
}
_NP_TO_ST = {np.dtype("<f2"): "F16", np.dtype("<f4"): "F32", np.dtype("<i8"): "I64", np.dtype("<i4"): "I32"}


def read_safetensors(
    path: str | os.PathLike, want: Any = None
) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Read a safetensors file. Returns (`__metadata__` dict, {name: array}); BF16 is widened to F32.
    `want(name) -> bool` selects the tensors to load (default all); others are only checked, not read."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CaptureError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CaptureError(f"{path}: not a safetensors file (too short)")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > 100_000_000:
            raise CaptureError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CaptureError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
        if not isinstance(header, dict):
            raise CaptureError(f"{path}: not a safetensors file (header is not an object)")
        meta = header.pop("__metadata__", None) or {}
        data_len = size - 8 - n
        tensors: dict[str, np.ndarray] = {}
        for name, t in header.items():
            try:
                st = t["dtype"]
                shape = [int(d) for d in t["shape"]]
                start, end = (int(x) for x in t["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CaptureError(f"{path}: tensor {name!r} has a malformed header entry") from None
            if st not in _ST_DTYPES:
                raise CaptureError(f"{path}: tensor {name!r} has unsupported dtype {st}")
            dt = _ST_DTYPES[st]
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if not (0 <= start <= end <= data_len) or end - start != count * dt.itemsize:
                raise CaptureError(f"{path}: tensor {name!r} has bad data offsets")
            if want is not None and not want(name):
                continue
            f.seek(8 + n + start)
            arr = np.frombuffer(f.read(end - start), dtype=dt).reshape(shape).copy()
            if st == "BF16":
                arr = (arr.astype(np.uint32) << 16).view(np.float32)
            tensors[name] = arr
    return dict(meta), tensors


@dataclass
class TensorSpec:
    name: str
    dtype: str  # "F16" | "F32" | "I64" | "I32"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _ST_DTYPES[self.dtype].itemsize


class SafetensorsWriter:
    """Streams a safetensors file: header first (all shapes declared up front), then each tensor's bytes in
    the declared order; a tensor may be written in pieces (row by row).

    The header reserves `slack` bytes of space padding so that metadata known only at the end (checks, end
    date) can be rewritten in place by `finish`. The file is written under a temporary name in the
    destination's folder; `finish` fsyncs and moves it into place with `os.replace`, `abort` deletes it.
    """

    def __init__(
        self,
        dest: str | os.PathLike,
        specs: list[TensorSpec],
        metadata: dict[str, str],
        *,
        tmp_path: str | os.PathLike | None = None,
        slack: int = 8192,
    ):
        self.dest = Path(dest)
        self.specs = list(specs)
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names")
        for s in self.specs:
            if s.dtype not in ("F16", "F32", "I64", "I32"):
                raise ValueError(f"writer: unsupported dtype {s.dtype}")
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        if tmp_path is None:
            fd, self.tmp = mkstemp_beside(self.dest)
            self.f = os.fdopen(fd, "w+b")
        else:
            self.tmp = Path(tmp_path)
            self.f = open(self.tmp, "w+b")
        self._done = False
        header = self._header(metadata)
        self.header_len = (len(header) + slack + 7) // 8 * 8
        self.f.write(self.header_len.to_bytes(8, "little"))
        self.f.write(header.ljust(self.header_len, b" "))
        self._cur = 0
        self._written = 0
        self._skip_empty()

    def _header(self, metadata: dict[str, str]) -> bytes:
        h: dict[str, Any] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
        off = 0
        for s in self.specs:
            h[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [off, off + s.nbytes]}
            off += s.nbytes
        return json.dumps(h, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    def _skip_empty(self) -> None:
        while self._cur < len(self.specs) and self.specs[self._cur].nbytes == self._written:
            self._cur += 1
            self._written = 0

    def write(self, name: str, array: np.ndarray) -> None:
        """Append `array` (any shape; element count must fit) to tensor `name`, which must be the current one."""
        if np.asarray(array).size == 0:  # zero-size tensors (e.g. --rollout 0) have no bytes to write
            if not any(s.name == name for s in self.specs):
                raise ValueError(f"writer: undeclared tensor {name!r}")
            return
        if self._cur >= len(self.specs):
            raise ValueError(f"writer: {name!r} written after all declared tensors")
        spec = self.specs[self._cur]
        if spec.name != name:
            raise ValueError(f"writer: expected bytes of {spec.name!r}, got {name!r}")
        b = np.ascontiguousarray(array, dtype=_ST_DTYPES[spec.dtype]).tobytes()
        if self._written + len(b) > spec.nbytes:
            raise ValueError(f"writer: {name!r} got more than its {spec.nbytes} bytes")
        self.f.write(b)
        self._written += len(b)
        self._skip_empty()

    def finish(self, metadata: dict[str, str] | None = None, *, rename: bool = True) -> Path:
        if self._cur != len(self.specs):
            s = self.specs[self._cur]
            raise ValueError(f"writer: tensor {s.name!r} got {self._written} of {s.nbytes} bytes")
        if metadata is not None:
            header = self._header(metadata)
            if len(header) <= self.header_len:
                self.f.seek(8)
                self.f.write(header.ljust(self.header_len, b" "))
            else:  # metadata outgrew the reserved space: rewrite the file with a larger header
                self._rewrite(header)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self._done = True
        if not rename:
            return self.tmp
        os.replace(self.tmp, self.dest)
        return self.dest

    def _rewrite(self, header: bytes) -> None:
        n = (len(header) + 7) // 8 * 8
        fd, tmp2 = mkstemp_beside(self.dest)
        with os.fdopen(fd, "wb") as out:
            out.write(n.to_bytes(8, "little"))
            out.write(header.ljust(n, b" "))
            self.f.seek(8 + self.header_len)
            shutil.copyfileobj(self.f, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        self.f.close()
        os.replace(tmp2, self.tmp)
        self.f = open(self.tmp, "r+b")
        self.header_len = n

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self.f.close()
        finally:
            try:
                self.tmp.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_capture_file(
    dest: str | os.PathLike, meta: dict[str, Any], seqs: list[dict[str, np.ndarray]]
) -> Path:
    """Write a small capture or plan from memory. `seqs[i]` maps field ("tokens", "logits", "top_ids",
    "top_logits", "argmax", "rollout") to an array; dtypes are kept (F16/F32 floats, I64/I32 ints)."""
    order = ("tokens", "logits", "top_ids", "top_logits", "argmax", "rollout")
    specs, arrays = [], []
    for i, s in enumerate(seqs):
        for f in order:
            if f in s:
                a = np.asarray(s[f])
                if a.dtype.kind in "iu":
                    a = a.astype("<i8") if a.dtype.itemsize == 8 or a.dtype.kind == "u" else a.astype("<i4")
                a = a.astype(a.dtype.newbyteorder("<"))
                specs.append(TensorSpec(f"seq.{i}.{f}", _NP_TO_ST[a.dtype], tuple(a.shape)))
                arrays.append(a)
    w = SafetensorsWriter(dest, specs, {META_KEY: json.dumps(meta, sort_keys=True)}, slack=0)
    with w:
        for s, a in zip(specs, arrays):
            w.write(s.name, a)
        return w.finish()


_SEQ_NAME = re.compile(r"^seq\.(\d+)\.([a-z_]+)$")


def read_plan(path: str | os.PathLike) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The token sequences of a plan (or of any capture). Accepts I64 and I32 tokens."""
    meta, tensors = read_safetensors(path, want=lambda name: name.endswith(".tokens"))
    pmeta: dict[str, Any] = {}
    if META_KEY in meta:
        try:
            pmeta = json.loads(meta[META_KEY])
        except json.JSONDecodeError:
            raise CaptureError(f"{path}: `{META_KEY}` metadata is not JSON") from None
        if pmeta.get("format") != FORMAT:
            raise CaptureError(f"{path}: capture format {pmeta.get('format')!r}, this tool reads {FORMAT!r}")
    seqs: dict[int, np.ndarray] = {}
    for name, arr in tensors.items():
        m = _SEQ_NAME.match(name)
        if not m:
            raise CaptureError(f"{path}: unexpected tensor {name!r} (expected seq.{{i}}.<field>)")
        if m.group(2) != "tokens":
            continue
        if arr.dtype not in (np.dtype("<i8"), np.dtype("<i4")) or arr.ndim != 1:
            raise CaptureError(f"{path}: {name} must be I64 or I32 [T], found {arr.dtype} {list(arr.shape)}")
        if arr.size == 0:
            raise CaptureError(f"{path}: {name} is empty")
        seqs[int(m.group(1))] = arr.astype(np.int64)
    if not seqs:
        raise CaptureError(f"{path}: no seq.{{i}}.tokens tensors: not a plan")
    if sorted(seqs) != list(range(len(seqs))):
        raise CaptureError(f"{path}: sequence indices are not 0..{len(seqs) - 1}")
    return [seqs[i] for i in range(len(seqs))], pmeta


def mkstemp_beside(dest: Path) -> tuple[int, Path]:
    """A temporary file in `dest`'s folder (same file system, so os.replace is atomic), with the permissions
    an ordinary new file would get (mkstemp makes it 0600)."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)
    return fd, Path(tmp)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ================================================================================================
# Bundle: metadata.json, asset, label
# ================================================================================================


def parse_label(name: str) -> tuple[str | None, list[str]]:
    """Quantization label from a bundle name, the way the zoo parses it (last path component, lower-cased,
    `findall`). Returns (label, tags): label joins distinct tags with '+', None when no tag matches."""
    tags: list[str] = []
    for t in PRECISION.findall(Path(name).name.lower()):
        if t not in tags:
            tags.append(t)
    return ("+".join(tags) if tags else None), tags


@dataclass
class Bundle:
    dir: Path
    name: str
    metadata: dict[str, Any] | None
    asset: Path
    asset_metadata: dict[str, Any] | None
    producer: str | None
    vocab_size: int | None
    max_context: int | None
    function: str
    warnings: list[str] = field(default_factory=list)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CaptureError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise CaptureError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise CaptureError(f"{path}: cannot be read ({e.strerror or e})") from None


def _obj(v: Any, where: str) -> dict:
    """A JSON object field (absent or null: empty), or a CaptureError naming it."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise CaptureError(f"{where}: expected a JSON object, found {type(v).__name__}")
    return v


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Read a LanguageBundle directory (metadata.json + asset). An `.aimodel`/`.aimodelc` path is accepted
    too (its parent's metadata.json is used when present)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CaptureError(f"--bundle {p}: no such file or directory")
    warnings: list[str] = []
    if p.suffix in (".aimodel", ".aimodelc"):
        asset = p
        bdir = p.parent
        meta = _read_json(bdir / "metadata.json") if (bdir / "metadata.json").is_file() else None
        warnings.append("--bundle points at an asset, not a bundle directory")
        name = p.stem
    else:
        bdir = p
        name = p.name
        mpath = p / "metadata.json"
        if not mpath.is_file():
            raise CaptureError(f"--bundle {p}: no metadata.json (expected a LanguageBundle directory)")
        meta = _read_json(mpath)
        if not isinstance(meta, dict):
            raise CaptureError(f"{mpath}: expected a JSON object")
        main = _obj(meta.get("assets"), f"{mpath}: assets").get("main")
        if not isinstance(main, str):
            raise CaptureError(f"{mpath}: no assets.main")
        asset = p / main
        if not asset.exists() and asset.suffix == ".aimodel":
            # the Swift reader falls back to X.aimodelc (coreai_formats.md §3.1)
            alt = asset.with_suffix(".aimodelc")
            if alt.exists():
                asset = alt
        if not asset.exists():
            raise CaptureError(f"{mpath}: assets.main {main!r} not found in {p}")
    lang = _obj((meta or {}).get("language"), "metadata.json: language")
    vocab = lang.get("vocab_size")
    max_ctx = lang.get("max_context_length")
    fmap = _obj(lang.get("function_map"), "metadata.json: language.function_map")
    fn = "main"
    if isinstance(fmap.get("main"), list) and fmap["main"]:
        fn = str(fmap["main"][0])
    ameta = None
    producer = None
    amp = asset / "metadata.json" if asset.is_dir() else None
    if amp is not None and amp.is_file():
        ameta = _read_json(amp)
        if isinstance(ameta, dict):
            producer = ameta.get("producer")
    if producer is None:
        warnings.append(
            f"asset {asset.name} has no `producer` in its metadata.json: an asset saved by coreai-torch 0.4.0, "
            "which the OS 27 beta >= 2 compiler refuses to load (zoo doctor rule IR-040-DEBUG-LOC); re-export it "
            "with coreai-torch >= 0.4.1 if loading fails"
        )
    return Bundle(
        dir=bdir,
        name=name,
        metadata=meta,
        asset=asset,
        asset_metadata=ameta if isinstance(ameta, dict) else None,
        producer=producer,
        vocab_size=int(vocab) if isinstance(vocab, int) else None,
        max_context=int(max_ctx) if isinstance(max_ctx, int) else None,
        function=fn,
        warnings=warnings,
    )


def asset_sha256(asset: Path) -> dict[str, str]:
    """sha256 of every file of the asset package, keyed by path relative to the asset (POSIX separators)."""
    if asset.is_file():
        return {asset.name: sha256_file(asset)}
    out: dict[str, str] = {}
    for root, dirs, files in os.walk(asset):
        dirs.sort()
        for f in sorted(files):
            fp = Path(root) / f
            out[fp.relative_to(asset).as_posix()] = sha256_file(fp)
    return dict(sorted(out.items()))


def os_build() -> dict[str, str] | None:
    """`sw_vers` as a dict (ProductName, ProductVersion, BuildVersion), or None off macOS."""
    exe = shutil.which("sw_vers")
    if not exe:
        return None
    try:
        out = subprocess.run([exe], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    d = {}
    for line in out.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            d[k.strip()] = v.strip()
    return d or None


def package_version(*names: str) -> str | None:
    from importlib import metadata as md

    for n in names:
        try:
            return md.version(n)
        except md.PackageNotFoundError:
            continue
    return None


# ================================================================================================
# llm-runner continuation-evaluation JSON (coreai_formats.md §1.4, §1.5)
# ================================================================================================


@dataclass
class LlmRunnerEval:
    """One `--raw-tokens … --save-logits` file. `positions[j]` is the row after `tokens[0..=j]` (capture row
    C_j), j = 0 … T-2; the row after the last token is not in the file."""

    tokens: np.ndarray  # [T] int64: context_tokens + continuation_tokens
    kind: str  # "full" | "top_k"
    rows: np.ndarray | None  # [T-1, V] float16 (Apple silicon) or float32 (x86_64 macOS)
    top_ids: np.ndarray | None  # [T-1, K] int64, in file order
    top_logits: np.ndarray | None  # [T-1, K] float32 (each JSON number rounded to f32)
    top_tokens: list[list[str]] | None
    target_log_probs: list[float]
    raw: dict[str, Any]

    @property
    def row_dtype(self) -> str:
        if self.rows is None:
            return "f32"
        return "f16" if self.rows.dtype == np.float16 else "f32"


def read_llm_runner_eval(
    source: str | os.PathLike | dict, *, vocab_size: int | None = None, row_dtype: str | None = None
) -> LlmRunnerEval:
    """Parse and check an `llm-runner` continuation-evaluation JSON written in raw-token mode.

    Row element type: `row_dtype` "f16"/"f32" if given; else inferred as (bytes per row) / `vocab_size`;
    else f16 (what Apple silicon writes). Only raw-token files (`context_tokens` of length 1) map onto
    capture rows; text-mode `--continuation` files and the generation schemas are refused.
    """
    where = "<dict>" if isinstance(source, dict) else str(source)
    if isinstance(source, dict):
        doc = source
    else:
        try:
            doc = json.loads(Path(source).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CaptureError(f"{where}: cannot read llm-runner JSON ({e})") from None

    def bad(msg: str) -> CaptureError:
        return CaptureError(f"{where}: {msg}")

    if not isinstance(doc, dict):
        raise bad("expected a JSON object")
    if "positions" not in doc:
        if "tokens" in doc:
            raise bad(
                "this is llm-runner's generation schema ({\"tokens\": [...]}), whose entries are not consecutive "
                "teacher-forced steps; capture with --raw-tokens (continuation-evaluation schema)"
            )
        raise bad("no `positions`: not an llm-runner continuation-evaluation file")
    ctx = doc.get("context_tokens")
    cont = doc.get("continuation_tokens")
    pos = doc.get("positions")
    if not (isinstance(ctx, list) and isinstance(cont, list) and isinstance(pos, list)):
        raise bad("context_tokens, continuation_tokens and positions must be arrays")
    if len(ctx) != 1:
        raise bad(
            f"context_tokens has {len(ctx)} ids; only raw-token evaluations (one context token) map onto capture "
            "rows starting at row 0"
        )
    tokens = np.asarray([int(x) for x in ctx + cont], dtype=np.int64)
    if len(tokens) < 2:
        raise bad("fewer than 2 tokens")
    if len(pos) != len(cont):
        raise bad(f"{len(pos)} positions for {len(cont)} continuation tokens")
    kinds = set()
    for j, p in enumerate(pos):
        if not isinstance(p, dict):
            raise bad(f"positions[{j}] is not an object")
        if int(p.get("index", -1)) != j:
            raise bad(f"positions[{j}].index is {p.get('index')!r}")
        if int(p.get("target_token", -1)) != cont[j]:
            raise bad(f"positions[{j}].target_token {p.get('target_token')!r} != continuation_tokens[{j}] {cont[j]}")
        if "logits_base64" in p:
            kinds.add("full")
        elif "top_k" in p:
            kinds.add("top_k")
        else:
            raise bad(f"positions[{j}] has neither logits_base64 nor top_k")
    if len(kinds) > 1:
        raise bad("positions mix logits_base64 and top_k")
    kind = kinds.pop() if kinds else "full"
    lps = [float(p.get("target_log_prob", float("nan"))) for p in pos]
    rows = top_ids = top_logits = None
    top_tokens = None
    if kind == "full":
        blobs = []
        for j, p in enumerate(pos):
            try:
                blobs.append(base64.b64decode(p["logits_base64"], validate=True))
            except (ValueError, TypeError) as e:
                raise bad(f"positions[{j}].logits_base64 is not base64 ({e})") from None
        lens = {len(b) for b in blobs}
        if len(lens) > 1:
            raise bad(f"rows have different byte lengths {sorted(lens)}")
        nbytes = lens.pop() if lens else 0
        if row_dtype is None:
            if vocab_size:
                if nbytes == 2 * vocab_size:
                    row_dtype = "f16"
                elif nbytes == 4 * vocab_size:
                    row_dtype = "f32"
                else:
                    raise bad(f"rows of {nbytes} bytes fit neither f16 nor f32 of vocab_size {vocab_size}")
            else:
                row_dtype = "f16"
        dt = {"f16": np.dtype("<f2"), "f32": np.dtype("<f4")}[row_dtype]
        if nbytes % dt.itemsize:
            raise bad(f"rows of {nbytes} bytes are not whole {row_dtype} values")
        v = nbytes // dt.itemsize
        if vocab_size is not None and v != vocab_size:
            raise bad(f"rows hold {v} {row_dtype} values but vocab_size is {vocab_size}")
        if v == 0 and pos:
            raise bad("empty rows")
        rows = np.stack([np.frombuffer(b, dtype=dt) for b in blobs]) if blobs else np.zeros((0, v), dt)
        rows = rows.astype(dt.newbyteorder("="))
    else:
        ks = {len(p["top_k"]) for p in pos}
        if len(ks) != 1 or 0 in ks:
            raise bad(f"top_k lists have lengths {sorted(ks)}; expected one K > 0")
        ids, lg, txt = [], [], []
        for j, p in enumerate(pos):
            try:
                ids.append([int(e["token_id"]) for e in p["top_k"]])
                # JSON numbers are parsed as double and rounded to f32: exact for the Float the writer held
                lg.append([float(e["logit"]) for e in p["top_k"]])
                txt.append([str(e.get("token", "")) for e in p["top_k"]])
            except (KeyError, TypeError, ValueError):
                raise bad(f"positions[{j}].top_k entries need token_id and logit") from None
        top_ids = np.asarray(ids, dtype=np.int64)
        top_logits = np.asarray(lg, dtype=np.float64).astype(np.float32)
        top_tokens = txt
        if vocab_size is not None and ((top_ids < 0) | (top_ids >= vocab_size)).any():
            raise bad("top_k token_id outside the vocabulary")
    return LlmRunnerEval(tokens, kind, rows, top_ids, top_logits, top_tokens, lps, doc)


# ================================================================================================
# Row storage: full / top-k / argmax, streamed into the capture
# ================================================================================================


def clean_for_ranking(row: np.ndarray) -> np.ndarray:
    r = row.astype(np.float32)
    return np.where(np.isnan(r), -np.inf, r)


def greedy(row: np.ndarray) -> int:
    """Greedy argmax on the row as the runtime returned it; ties go to the lowest id, NaN ranks lowest."""
    return int(np.argmax(clean_for_ranking(row)))


def top_k(row: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest logits, descending; ties ordered by ascending id. Values returned exactly (as f32)."""
    r = clean_for_ranking(row)
    idx = np.argsort(-r, kind="stable")[:k]
    return idx.astype(np.int64), row.astype(np.float32)[idx]


class Recorder:
    """Lays out a capture (shapes known from the plan up front) and streams rows into it."""

    def __init__(
        self,
        dest: Path,
        plan: list[np.ndarray],
        *,
        storage: str,  # "full" | "top-k" | "argmax"
        vocab: int,
        row_dtype: str,  # "F16" | "F32" (full storage)
        k: int,
        rollout: int,
        metadata: dict[str, Any],
        tmp_path: Path | None = None,
    ):
        self.plan, self.storage, self.vocab, self.k, self.rollout = plan, storage, vocab, k, rollout
        self.row_dtype = row_dtype
        self.meta = metadata
        specs: list[TensorSpec] = []
        for i, toks in enumerate(plan):
            t = len(toks)
            specs.append(TensorSpec(f"seq.{i}.tokens", "I64", (t,)))
            if storage == "full":
                specs.append(TensorSpec(f"seq.{i}.logits", row_dtype, (t, vocab)))
            elif storage == "top-k":
                specs.append(TensorSpec(f"seq.{i}.top_ids", "I64", (t, k)))
                specs.append(TensorSpec(f"seq.{i}.top_logits", "F32", (t, k)))
            elif storage == "argmax":
                specs.append(TensorSpec(f"seq.{i}.argmax", "I64", (t,)))
            else:
                raise ValueError(storage)
            specs.append(TensorSpec(f"seq.{i}.rollout", "I64", (rollout,)))
        self.w = SafetensorsWriter(dest, specs, self._md(), tmp_path=tmp_path)
        self._seq = -1
        self._rows = 0
        self._buf: list[Any] = []
        self.nonfinite_rows = 0

    def _md(self) -> dict[str, str]:
        return {META_KEY: json.dumps(self.meta, sort_keys=True, ensure_ascii=True)}

    def begin(self, i: int) -> None:
        assert i == self._seq + 1 and self._rows == 0
        self._seq = i
        self.w.write(f"seq.{i}.tokens", self.plan[i])

    def row(self, row: np.ndarray | int) -> None:
        i = self._seq
        if self._rows >= len(self.plan[i]):
            raise ValueError("more rows than plan tokens")
        if self.storage == "argmax":
            self._buf.append(int(row))
        else:
            row = np.asarray(row).reshape(-1)
            if row.shape[0] != self.vocab:
                raise RuntimeFailure(f"logits row has {row.shape[0]} values, expected vocab_size {self.vocab}")
            if not np.isfinite(row.astype(np.float32)).all():
                self.nonfinite_rows += 1
            if self.storage == "full":
                self.w.write(f"seq.{i}.logits", row)
            else:
                self._buf.append(top_k(row, self.k))
        self._rows += 1

    def end(self, rollout: list[int]) -> None:
        i = self._seq
        if self._rows != len(self.plan[i]):
            raise ValueError(f"seq {i}: {self._rows} rows for {len(self.plan[i])} tokens")
        if len(rollout) != self.rollout:
            raise ValueError("rollout length")
        if self.storage == "top-k":
            self.w.write(f"seq.{i}.top_ids", np.stack([b[0] for b in self._buf]))
            self.w.write(f"seq.{i}.top_logits", np.stack([b[1] for b in self._buf]))
        elif self.storage == "argmax":
            self.w.write(f"seq.{i}.argmax", np.asarray(self._buf, dtype=np.int64))
        self.w.write(f"seq.{i}.rollout", np.asarray(rollout, dtype=np.int64))
        self._buf = []
        self._rows = 0

    def finish(self, *, rename: bool = True) -> Path:
        self.meta.setdefault("checks", {})["nonfinite_rows"] = self.nonfinite_rows
        if self.nonfinite_rows:
            warn(f"{self.nonfinite_rows} rows contain NaN or infinite logits")
        self.meta["finished"] = utc_now()
        return self.w.finish(self._md(), rename=rename)

    def abort(self) -> None:
        self.w.abort()


# ================================================================================================
# Python driver: coreai.runtime, S=1 decode stepping (coreai_formats.md §4)
# ================================================================================================

_DTYPE_ALIASES = {
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
    "int32": "int32", "i32": "int32", "int64": "int64", "i64": "int64",
    "bfloat16": "bfloat16", "bf16": "bfloat16", "int8": "int8", "uint8": "uint8", "bool": "bool",
}


def norm_dtype(x: Any) -> str:
    """'Float16', 'float16', np.float16, 'DataType.FLOAT16', … -> 'float16'. Unknown -> lower-cased str."""
    if isinstance(x, np.dtype) or (isinstance(x, type) and issubclass(x, np.generic)):
        return np.dtype(x).name
    s = str(getattr(x, "name", x) if not isinstance(x, str) else x).strip().lower()
    s = s.split(".")[-1].replace("_", "")
    return _DTYPE_ALIASES.get(s, s)


@dataclass
class TensorInfo:
    dtype: str  # normalised, e.g. "float16", "int32"
    shape: list[int | None]  # None = dynamic dimension

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": [("?" if d is None else d) for d in self.shape]}


@dataclass
class Contract:
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]
    states: dict[str, TensorInfo]
    source: str  # how it was obtained

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "inputs": {k: v.to_json() for k, v in self.inputs.items()},
            "outputs": {k: v.to_json() for k, v in self.outputs.items()},
            "states": {k: v.to_json() for k, v in self.states.items()},
        }


def _dim(d: Any) -> int | None:
    if d is None:
        return None
    if isinstance(d, (int, np.integer)) and not isinstance(d, bool):
        return int(d) if d >= 0 else None
    if isinstance(d, str):
        return int(d) if d.strip().isdigit() else None
    for attr in ("is_dynamic", "isDynamic", "dynamic"):
        v = getattr(d, attr, None)
        if v is not None and (v() if callable(v) else v):
            return None
    for attr in ("value", "size", "static_value"):
        v = getattr(d, attr, None)
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return int(v) if v >= 0 else None
    return None


def _call_or_value(v: Any) -> Any:
    if callable(v) and not isinstance(v, (list, tuple, dict, str)):
        try:
            return v()
        except TypeError:
            return None
    return v


def _tensor_info(d: Any) -> TensorInfo:
    dt = None
    for a in ("dtype", "data_type", "dataType", "scalar_type", "scalarType", "element_type", "elementType"):
        if hasattr(d, a):
            dt = _call_or_value(getattr(d, a))
            if dt is not None:
                break
    shape = None
    for a in ("shape", "dims", "dimensions"):
        if hasattr(d, a):
            shape = _call_or_value(getattr(d, a))
            if shape is not None:
                break
    if dt is None or shape is None:
        raise LookupError(f"descriptor {d!r} exposes no dtype/shape")
    return TensorInfo(norm_dtype(dt), [_dim(x) for x in list(shape)])


def _desc_group(desc: Any, kind: str) -> dict[str, TensorInfo]:
    """kind in ('input', 'output', 'state'). UNCONFIRMED: the Python attribute names of
    InferenceFunctionDescriptor (coreai_formats.md §4.2). Tries snake_case and Swift-style camelCase names,
    then a collection attribute (`inputs` as dict or list of named descriptors)."""
    names = None
    for a in (f"{kind}_names", f"{kind}Names"):
        if hasattr(desc, a):
            names = _call_or_value(getattr(desc, a))
            if names is not None:
                names = [str(n) for n in names]
                break
    if names is not None:
        out = {}
        for n in names:
            d = None
            for a in (f"{kind}_descriptor", f"{kind}Descriptor", f"{kind}_description"):
                if hasattr(desc, a):
                    d = getattr(desc, a)(n)
                    break
            if d is None:
                coll = getattr(desc, f"{kind}s", None)
                coll = _call_or_value(coll)
                if isinstance(coll, dict):
                    d = coll.get(n)
            if d is None:
                raise LookupError(f"no descriptor for {kind} {n!r}")
            out[n] = _tensor_info(d)
        return out
    coll = _call_or_value(getattr(desc, f"{kind}s", None))
    if isinstance(coll, dict):
        return {str(k): _tensor_info(v) for k, v in coll.items()}
    if isinstance(coll, (list, tuple)):
        return {str(getattr(v, "name")): _tensor_info(v) for v in coll}
    raise LookupError(f"descriptor has no {kind} names")


def contract_from_descriptor(fn: Any) -> Contract:
    desc = None
    for a in ("desc", "descriptor", "description"):
        if hasattr(fn, a):
            desc = _call_or_value(getattr(fn, a))
            if desc is not None:
                break
    if desc is None:
        raise LookupError("function has no `desc`")
    try:
        inputs = _desc_group(desc, "input")
        outputs = _desc_group(desc, "output")
    except LookupError as e:
        attrs = sorted(a for a in dir(desc) if not a.startswith("_"))
        raise LookupError(f"{e}; descriptor attributes: {attrs}") from None
    try:
        states = _desc_group(desc, "state")
    except LookupError:
        states = {}
    return Contract(inputs, outputs, states, "coreai.runtime descriptor (fn.desc)")


_NDARRAY_TYPE = re.compile(r"^\s*NDArray\s*\(\s*([A-Za-z0-9_]+)\s*,\s*(.*?)\s*\)\s*$")


def parse_coreai_build_type(s: str) -> TensorInfo:
    """`NDArray (Float16, 44 x 1 x 8 x ? x 128)` -> TensorInfo (coreai_formats.md §3.3)."""
    m = _NDARRAY_TYPE.match(s)
    if not m:
        raise LookupError(f"unrecognised type string {s!r}")
    dims = [d.strip() for d in m.group(2).split("x")] if m.group(2).strip() else []
    return TensorInfo(norm_dtype(m.group(1)), [(int(d) if d.isdigit() else None) for d in dims])


def contract_from_inspect_json(doc: dict, function: str, source: str) -> Contract:
    funcs = (doc.get("summary") or doc).get("functions") or []
    for f in funcs:
        if f.get("name") == function:

            def grp(key: str) -> dict[str, TensorInfo]:
                return {str(e["name"]): parse_coreai_build_type(str(e["type"])) for e in f.get(key) or []}

            return Contract(grp("inputs"), grp("outputs"), grp("states"), source)
    raise LookupError(f"function {function!r} not in {[f.get('name') for f in funcs]}")


def contract_from_coreai_build(asset: Path, function: str) -> Contract:
    """Fallback: `xcrun coreai-build inspect <asset> --ops --json` (as zoo `cli/coreai_doctor.py` uses it)."""
    xcrun = shutil.which("xcrun")
    if not xcrun:
        raise LookupError("xcrun not found")
    cmd = [xcrun, "coreai-build", "inspect", str(asset), "--ops", "--json"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        raise LookupError(f"{' '.join(cmd)}: {e}") from None
    if r.returncode != 0:
        raise LookupError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()[-500:]}")
    try:
        doc = json.loads(r.stdout)
    except json.JSONDecodeError as e:
        raise LookupError(f"coreai-build inspect output is not JSON ({e})") from None
    return contract_from_inspect_json(doc, function, "xcrun coreai-build inspect --ops --json")


def contract_from_file(path: Path) -> Contract:
    """`--contract FILE`: {"inputs": {name: {"dtype": "int32", "shape": [1, 1]}}, "outputs": …, "states": …};
    a dimension may be "?" or null for dynamic."""
    doc = _read_json(path)

    def grp(key: str) -> dict[str, TensorInfo]:
        return {
            str(k): TensorInfo(norm_dtype(v["dtype"]), [_dim(d) for d in v["shape"]])
            for k, v in (doc.get(key) or {}).items()
        }

    return Contract(grp("inputs"), grp("outputs"), grp("states"), f"--contract {path}")


@dataclass
class StepPlan:
    """The checked contract the stepping loop uses."""

    input_ids: str
    position_ids: str
    output: str
    output_kind: str  # "logits" | "argmax"
    logits_dtype: str  # "float16" | "float32" (logits outputs)
    states: dict[str, tuple[np.dtype, tuple[int, ...]]]


def check_contract(c: Contract, vocab: int | None, state_len: int) -> StepPlan:
    """Fail with a clear message unless this is a static-[1,1]-input S=1 decode function with states."""
    ins = c.inputs
    if "input_ids" not in ins or "position_ids" not in ins:
        raise CaptureError(
            f"the function's inputs are {sorted(ins)}; the python driver needs `input_ids` and `position_ids` "
            "(the Qwen3.5 S=1 decode contract). Use --driver llm-runner for other graphs."
        )
    ii, pi = ins["input_ids"], ins["position_ids"]
    if len(ii.shape) != 2 or ii.shape[0] != 1 or ii.shape[1] is None or ii.shape[1] != 1:
        shape = ii.to_json()["shape"]
        dyn = " (dynamic)" if any(d is None for d in ii.shape) else ""
        raise CaptureError(
            f"input_ids has shape {shape}{dyn}, not the static [1,1] of an S=1 decode bundle. This bundle takes "
            "several tokens per call (prefill/dynamic graph): capture it with --driver llm-runner, which runs "
            "Apple's llm-runner sequential engine."
        )
    if ii.dtype != "int32":
        raise CaptureError(f"input_ids is {ii.dtype}; expected int32")
    if pi.dtype != "int32" or len(pi.shape) != 2 or pi.shape[0] not in (1, None):
        raise CaptureError(f"position_ids is {pi.dtype} {pi.to_json()['shape']}; expected int32 [1, P]")
    extra = sorted(set(ins) - {"input_ids", "position_ids"})
    if extra:
        raise CaptureError(f"the function has inputs {extra} besides input_ids/position_ids; not supported")
    if not c.states:
        raise CaptureError(
            "the function declares no states: stepping one token per call would lose all context. "
            "Use --driver llm-runner for stateless graphs."
        )
    outs = c.outputs
    if "logits" in outs:
        o = outs["logits"]
        if o.dtype not in ("float16", "float32"):
            raise CaptureError(f"logits output is {o.dtype}; expected float16 or float32")
        if o.shape and o.shape[-1] is not None and vocab is not None and o.shape[-1] != vocab:
            raise CaptureError(
                f"logits output has {o.shape[-1]} columns but the bundle's language.vocab_size is {vocab}"
            )
        if len(o.shape) != 3 or o.shape[0] != 1 or o.shape[1] != 1:
            raise CaptureError(
                f"logits output has shape {o.to_json()['shape']}; the python driver needs static [1,1,vocab]. "
                "Use --driver llm-runner."
            )
        step = StepPlan("input_ids", "position_ids", "logits", "logits", o.dtype, {})
    else:
        ints = [n for n, o in outs.items() if o.dtype in ("int32", "int64")]
        if len(outs) == 1 and len(ints) == 1:
            step = StepPlan("input_ids", "position_ids", ints[0], "argmax", "", {})
        else:
            raise CaptureError(
                f"the function's outputs are {sorted(outs)}: no `logits` output and not a single integer "
                "(argmax) output"
            )
    for n, s in c.states.items():
        try:
            dt = np.dtype(s.dtype)
        except TypeError:
            raise CaptureError(f"state {n!r} has dtype {s.dtype!r}, which numpy cannot allocate") from None
        step.states[n] = (dt, tuple(state_len if d is None else d for d in s.shape))
    return step


def make_options(rt: Any, compute: str) -> Any:
    """Always explicit specialization options (never None). `cpu_only()` is the parity default."""
    so = rt.SpecializationOptions
    if compute == "cpu":
        return so.cpu_only()
    if compute == "default":
        return so.default()
    kinds = rt.ComputeUnitKind
    if compute == "gpu":
        return so.from_preferred_compute_unit_kind(kinds.gpu())
    if compute == "ane":
        # UNCONFIRMED: the name of the Neural Engine kind on ComputeUnitKind (no source read uses it).
        for n in ("neural_engine", "ane", "npu"):
            if hasattr(kinds, n):
                return so.from_preferred_compute_unit_kind(getattr(kinds, n)())
        raise CaptureError(f"coreai.runtime.ComputeUnitKind has no Neural Engine kind: {dir(kinds)}")
    raise CaptureError(f"unknown --compute {compute!r}")


async def _maybe_await(x: Any) -> Any:
    return await x if inspect.isawaitable(x) else x


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "numpy"):
        x = x.numpy()
    return np.array(x, copy=True)


class PythonDriver:
    runtime = "coreai-python"

    def __init__(self, args: argparse.Namespace, bundle: Bundle, plan: list[np.ndarray]):
        self.args, self.bundle, self.plan = args, bundle, plan
        self.rt: Any = None
        self.model: Any = None  # held for the whole run: dropping it frees the function under us
        self.fn: Any = None
        self.step: StepPlan | None = None
        self.contract: Contract | None = None
        self.calls = 0
        self.state_len = 0
        self.first_row: np.ndarray | int | None = None  # row 0 of sequence 0, for the repeat check

    async def load(self) -> None:
        try:
            self.rt = importlib.import_module("coreai.runtime")
        except ImportError as e:
            raise CaptureError(f"cannot import coreai.runtime ({e}); install Apple's coreai Python package") from None
        rt = self.rt
        opts = make_options(rt, self.args.compute)
        info(f"loading {self.bundle.asset} (compute {self.args.compute})")
        self.model = await _maybe_await(rt.AIModel.load(str(self.bundle.asset), opts))
        names = getattr(self.model, "function_names", None)
        names = _call_or_value(names)
        if names is not None and self.bundle.function not in list(names):
            raise CaptureError(f"the asset has functions {list(names)}, not {self.bundle.function!r}")
        self.fn = await _maybe_await(self.model.load_function(self.bundle.function))
        self.contract = self._contract()
        longest = max(len(t) for t in self.plan) + max(self.args.rollout - 1, 0)
        self.state_len = self.args.state_len or self.bundle.max_context or max(2048, longest)
        if longest > self.state_len:
            raise CaptureError(
                f"the longest sequence needs {longest} positions but states hold {self.state_len} "
                "(--state-len, or the bundle's language.max_context_length)"
            )
        self.step = check_contract(self.contract, self.bundle.vocab_size, self.state_len)

    def _contract(self) -> Contract:
        if self.args.contract:
            return contract_from_file(Path(self.args.contract))
        errors = []
        try:
            return contract_from_descriptor(self.fn)
        except LookupError as e:
            errors.append(f"fn.desc: {e}")
        try:
            c = contract_from_coreai_build(self.bundle.asset, self.bundle.function)
            warn(f"read the function's contract with xcrun coreai-build inspect ({errors[0]})")
            return c
        except LookupError as e:
            errors.append(f"coreai-build inspect: {e}")
        raise CaptureError(
            "cannot read the function's inputs/outputs/states: "
            + "; ".join(errors)
            + ". Pass --contract FILE (see README) and please report the descriptor attributes shown."
        )

    def fresh_states(self) -> dict[str, Any]:
        assert self.step is not None
        return {n: self.rt.NDArray(np.zeros(shape, dtype=dt)) for n, (dt, shape) in self.step.states.items()}

    async def call(self, states: dict[str, Any], token: int, t: int) -> np.ndarray | int:
        """One S=1 step: token at position t, position_ids = 0..t (the full range every step; the graph takes
        the offset as P - query_len). The first step sends P = 1, below the traced minimum of 2: the zoo reports
        that macOS tolerates this and iOS MPSGraph asserts on it (UNCONFIRMED here)."""
        rt, step = self.rt, self.step
        assert step is not None
        inputs = {
            step.input_ids: rt.NDArray(np.ascontiguousarray(np.array([[token]], dtype=np.int32))),
            step.position_ids: rt.NDArray(np.ascontiguousarray(np.arange(t + 1, dtype=np.int32)[None, :])),
        }
        out = await _maybe_await(self.fn(inputs=inputs, state=states))
        self.calls += 1
        if step.output not in out:
            raise RuntimeFailure(f"the call returned {sorted(out)}, not {step.output!r}")
        y = _to_numpy(out[step.output])
        if step.output_kind == "argmax":
            if y.size != 1:
                raise RuntimeFailure(f"argmax output has shape {list(y.shape)}")
            return int(y.reshape(-1)[0])
        v = self.bundle.vocab_size or y.shape[-1]
        if y.size != v:
            raise RuntimeFailure(f"logits output has shape {list(y.shape)}, expected [1,1,{v}]")
        if y.dtype not in (np.float16, np.float32):
            raise RuntimeFailure(f"logits output has dtype {y.dtype}")
        return y.reshape(-1)

    async def run_sequence(self, rec: Recorder | None, i: int, tokens: np.ndarray, rollout: int) -> list[int]:
        states = self.fresh_states()  # zeros, fresh for every sequence
        if rec:
            rec.begin(i)
        last: np.ndarray | int = 0
        for t, tok in enumerate(tokens):
            last = await self.call(states, int(tok), t)
            if self.first_row is None:
                self.first_row = last if isinstance(last, int) else np.array(last, copy=True)
            if rec:
                rec.row(last)
        gen: list[int] = []
        pos = len(tokens)
        while len(gen) < rollout:
            nxt = last if isinstance(last, int) else greedy(last)
            gen.append(nxt)
            if len(gen) == rollout:
                break
            last = await self.call(states, nxt, pos)
            pos += 1
        if rec:
            rec.end(gen)
        return gen


# ================================================================================================
# llm-runner driver (coreai_formats.md §1)
# ================================================================================================

LLM_RUNNER_PAD_TOKEN = 0  # appended after the plan so the row after the last real token appears (§1.3)


class LlmRunnerDriver:
    runtime = "coreai-llm-runner"

    def __init__(self, args: argparse.Namespace, bundle: Bundle, plan: list[np.ndarray], workdir: Path):
        self.args, self.bundle, self.plan, self.workdir = args, bundle, plan, workdir
        exe = args.llm_runner or os.environ.get("LLM_RUNNER") or shutil.which("llm-runner")
        if not exe:
            raise CaptureError("llm-runner not found: put it on PATH or pass --llm-runner PATH (or set LLM_RUNNER)")
        p = Path(exe)
        if not p.is_file():
            found = shutil.which(exe)
            if not found:
                raise CaptureError(f"llm-runner {exe!r} not found")
            p = Path(found)
        self.exe = p
        self.vocab = args.vocab_size or bundle.vocab_size
        if not self.vocab:
            raise CaptureError("the bundle's metadata.json has no language.vocab_size; pass --vocab-size")
        self.env = dict(os.environ)
        ct = args.chunk_threshold
        if ct is None:
            try:
                ct = int(self.env.get("COREAI_CHUNK_THRESHOLD", "1"))
            except ValueError:
                raise CaptureError("COREAI_CHUNK_THRESHOLD in the environment is not an integer") from None
        if ct > 0:
            # static [1,1] bundles can only be driven one token per call (§1.3); harmless for dynamic graphs
            self.env["COREAI_CHUNK_THRESHOLD"] = str(ct)
        else:
            self.env.pop("COREAI_CHUNK_THRESHOLD", None)
        self.chunk_threshold = ct
        self.calls = 0
        self.prefix_mismatch_rows = 0
        self.row_dtype: str | None = None

    def argv(self, raw: Path, out: Path) -> list[str]:
        return [
            str(self.exe), "--model", str(self.bundle.dir), "--raw-tokens", str(raw),
            "--save-logits", str(out), "--save-logits-length", "full", "--temperature", "0.0",
            "--warmup", "off", "--inference-engine-variant", "coreai-sequential",
        ]

    def evaluate(self, tokens: list[int]) -> np.ndarray:
        """Rows C_0..C_{n-1} for the n given tokens (one pad token is appended for the last row)."""
        self.calls += 1
        raw = self.workdir / f"raw-{self.calls}.json"
        out = self.workdir / f"logits-{self.calls}.json"
        sent = [int(x) for x in tokens] + [LLM_RUNNER_PAD_TOKEN]
        raw.write_text(json.dumps({"tokens": sent}))
        cmd = self.argv(raw, out)
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        log = self.workdir / f"llm-runner-{self.calls}.log"
        log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip()[-2000:]
            if r.returncode < 0:
                try:
                    sig = signal.Signals(-r.returncode).name
                except ValueError:
                    sig = f"signal {-r.returncode}"
                what = f"llm-runner crashed (killed by {sig})"
            else:
                what = f"llm-runner exited with status {r.returncode}"
            raise RuntimeFailure(f"{what}.\n{tail}")
        if not out.is_file():
            raise RuntimeFailure(f"llm-runner exited 0 but wrote no {out.name}")
        ev = read_llm_runner_eval(out, vocab_size=self.vocab)
        if ev.kind != "full":
            raise RuntimeFailure("llm-runner wrote top-k entries although --save-logits-length full was passed")
        if ev.tokens.tolist() != sent:
            raise RuntimeFailure(f"llm-runner evaluated tokens {ev.tokens.tolist()[:8]}…, not the ones sent")
        assert ev.rows is not None
        if self.row_dtype is None:
            self.row_dtype = ev.row_dtype
        elif self.row_dtype != ev.row_dtype:
            raise RuntimeFailure("llm-runner changed row element type between runs")
        if not self.args.keep_runner_files:
            for f in (raw, out):
                f.unlink(missing_ok=True)
        return ev.rows

    def run_sequence(self, i: int, tokens: np.ndarray, rollout: int) -> tuple[np.ndarray, list[int]]:
        toks = [int(x) for x in tokens]
        rows = self.evaluate(toks)
        gen: list[int] = []
        last = rows[-1]
        while len(gen) < rollout:
            gen.append(greedy(last))
            if len(gen) == rollout:
                break
            # raw-token evaluation does not generate: extend by one greedy token and re-evaluate
            r = self.evaluate(toks + gen)
            same = np.all(r[: len(toks)].view(np.uint8) == rows.view(np.uint8), axis=1)
            self.prefix_mismatch_rows += int((~same).sum())
            last = r[-1]
        return rows, gen


# ================================================================================================
# Orchestration
# ================================================================================================


def _public_argv(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--worker-out":
            skip = True
        elif not a.startswith("--worker-out="):
            out.append(a)
    return out


def build_metadata(args: argparse.Namespace, bundle: Bundle, plan: list[np.ndarray], plan_meta: dict) -> dict:
    if args.label:
        label, tags, src = args.label, parse_label(bundle.name)[1], "--label"
    else:
        label, tags = parse_label(bundle.name)
        src = "bundle name (zoo PRECISION regex)"
        if label is None:
            label, src = bundle.name, "bundle name (no quantization tag matched)"
            warn(f"no quantization tag in bundle name {bundle.name!r}; label is the whole name (use --label)")
    quantized = any(t.startswith(QUANTIZED) for t in tags)
    storage = "top-k" if args.top_k else "full"
    meta: dict[str, Any] = {
        "format": FORMAT,
        "label": label,
        "runtime": "coreai-python" if args.driver == "python" else "coreai-llm-runner",
        "dtype": "f16",  # precision of the runtime's logits; finalised once the first row is seen
        "vocab_size": args.vocab_size or bundle.vocab_size,
        "label_source": src,
        "label_tags": tags,
        "label_quantized": quantized,
        "tool": {"name": TOOL_NAME, "version": TOOL_VERSION, "argv": _public_argv(sys.argv[1:])},
        "driver": args.driver,
        "compute": args.compute,
        "storage": storage,
        "top_k": args.top_k or None,
        "rollout": args.rollout,
        "rollout_rule": "greedy argmax of the runtime's row, lowest id on ties, fixed length (no EOS stop)",
        "row_alignment": "row t = logits after tokens[0..=t]",
        "bundle": {
            "name": bundle.name,
            "path": str(bundle.dir.resolve()),
            "metadata": bundle.metadata,
            "asset": bundle.asset.name,
            "asset_metadata": bundle.asset_metadata,
            "producer": bundle.producer,
            "function": bundle.function,
            "asset_sha256": asset_sha256(bundle.asset),
        },
        "plan": {
            "path": str(Path(args.plan).resolve()),
            "sha256": sha256_file(Path(args.plan)),
            "label": plan_meta.get("label"),
            "sequences": len(plan),
            "tokens": int(sum(len(t) for t in plan)),
        },
        "os": {
            "sw_vers": os_build(),
            "platform": platform.platform(),
            "machine": platform.machine(),
        },
        "python": platform.python_version(),
        "numpy": np.__version__,
        "coreai": package_version("coreai-core", "coreai"),
        "date": utc_now(),
        "warnings": list(bundle.warnings),
    }
    return meta


async def _run_python(args, bundle, plan, meta, dest: Path, tmp_path: Path | None) -> Path:
    drv = PythonDriver(args, bundle, plan)
    await drv.load()
    step, contract = drv.step, drv.contract
    assert step is not None and contract is not None
    vocab = bundle.vocab_size or (contract.outputs[step.output].shape[-1] if step.output_kind == "logits" else None)
    if not vocab:
        raise CaptureError("vocab size unknown: the bundle metadata has no language.vocab_size")
    for s in plan:
        if s.min() < 0 or s.max() >= vocab:
            raise CaptureError(f"plan token ids must be in [0, {vocab})")
    storage = "argmax" if step.output_kind == "argmax" else ("top-k" if args.top_k else "full")
    if step.output_kind == "argmax" and (args.top_k or args.full):
        raise CaptureError("this bundle outputs only the argmax token; --full/--top-k are not available")
    total = sum(len(t) + max(args.rollout - 1, 0) for t in plan) + 1
    if total > ZOO_CALL_CAP:
        warn(
            f"this run makes {total} runtime calls; the runtime leaks an IOSurface per call and the zoo caps a "
            f"process at {ZOO_CALL_CAP}. Split the plan if the run fails late."
        )
    mod = sys.modules.get("coreai")
    meta.update(
        coreai=package_version("coreai-core", "coreai") or getattr(mod, "__version__", None),
        coreai_module=getattr(mod, "__file__", None),
        vocab_size=vocab,
        storage=storage,
        dtype={"float16": "f16", "float32": "f32"}.get(step.logits_dtype, "f16"),
        function={"name": bundle.function, **contract.to_json()},
        state_len=drv.state_len,
    )
    # Repeat the first row on fresh states: a bit-identical repeat is the zoo readout gate's sanity check.
    probe_states = drv.fresh_states()
    probe = await drv.call(probe_states, int(plan[0][0]), 0)
    del probe_states
    rec = Recorder(
        dest, plan, storage=storage, vocab=vocab,
        row_dtype="F16" if step.logits_dtype != "float32" else "F32",
        k=args.top_k or 0, rollout=args.rollout, metadata=meta, tmp_path=tmp_path,
    )
    try:
        for i, toks in enumerate(plan):
            info(f"sequence {i + 1}/{len(plan)}: {len(toks)} tokens + rollout {args.rollout}")
            await drv.run_sequence(rec, i, toks, args.rollout)
        first_row = drv.first_row
        if isinstance(probe, int):
            identical = probe == first_row
        else:
            identical = bool(np.array_equal(np.asarray(probe).view(np.uint8), np.asarray(first_row).view(np.uint8)))
        if not identical:
            warn("the first row differs between two fresh-state runs: this runtime path is not deterministic")
            meta["warnings"].append("first row not bit-identical on repeat")
        meta.setdefault("checks", {})["first_row_repeat_bit_identical"] = identical
        meta["calls"] = drv.calls
        path = rec.finish(rename=tmp_path is None)
    except BaseException:
        rec.abort()
        raise
    finally:
        drv.model = None  # released only after the last call
    return path


def _run_llm_runner(args, bundle, plan, meta, dest: Path) -> Path:
    if args.keep_runner_files:
        workdir = Path(args.keep_runner_files)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="qgate-llm-runner-"))  # this run's own: removed when done
    drv = LlmRunnerDriver(args, bundle, plan, workdir)
    vocab = drv.vocab
    for s in plan:
        if s.min() < 0 or s.max() >= vocab:
            raise CaptureError(f"plan token ids must be in [0, {vocab})")
    rec: Recorder | None = None
    try:
        for i, toks in enumerate(plan):
            info(f"sequence {i + 1}/{len(plan)}: {len(toks)} tokens + rollout {args.rollout} (llm-runner)")
            rows, gen = drv.run_sequence(i, toks, args.rollout)
            if rec is None:
                meta.update(
                    vocab_size=vocab,
                    dtype=drv.row_dtype,
                    llm_runner={
                        "path": str(drv.exe),
                        "sha256": sha256_file(drv.exe),
                        "argv": drv.argv(Path("RAW.json"), Path("OUT.json"))[1:],
                        "env": {"COREAI_CHUNK_THRESHOLD": drv.env.get("COREAI_CHUNK_THRESHOLD")},
                        "pad_token": LLM_RUNNER_PAD_TOKEN,
                        "schema": "continuation-evaluation (raw tokens), plan + [pad_token]",
                    },
                )
                rec = Recorder(
                    dest, plan, storage="top-k" if args.top_k else "full", vocab=vocab,
                    row_dtype="F16" if drv.row_dtype == "f16" else "F32",
                    k=args.top_k or 0, rollout=args.rollout, metadata=meta,
                )
            rec.begin(i)
            for r in rows:
                rec.row(r)
            rec.end(gen)
        assert rec is not None
        meta["calls"] = drv.calls
        meta.setdefault("checks", {})["rollout_prefix_rows_not_bit_identical"] = drv.prefix_mismatch_rows
        if drv.prefix_mismatch_rows:
            warn(f"{drv.prefix_mismatch_rows} rows differed between llm-runner runs over the same prefix")
            meta["warnings"].append("llm-runner rows not reproducible across runs")
        return rec.finish()
    except BaseException:
        if rec is not None:
            rec.abort()
        raise
    finally:
        if not args.keep_runner_files:
            shutil.rmtree(workdir, ignore_errors=True)


def check_out(args: argparse.Namespace) -> None:
    """Check `--out` before any work: never a directory, the plan, a file inside the bundle, or an existing
    file that is not a qgate capture (this tool only replaces its own kind of file), and its folder (or the
    nearest existing one above it) must be a folder this process can write in."""
    dest = Path(args.out)
    if dest.is_dir():
        raise CaptureError(f"{dest}: is a directory; --out names the capture file to write")
    try:
        if dest.exists() and Path(args.plan).exists() and os.path.samefile(dest, args.plan):
            raise CaptureError(f"{dest}: is also the --plan; choose another --out")
    except OSError:
        pass
    try:
        if dest.resolve().is_relative_to(Path(args.bundle).resolve()):
            raise CaptureError(f"{dest}: is inside the --bundle {args.bundle}; choose another --out")
    except (OSError, RuntimeError):
        pass
    if dest.exists() or dest.is_symlink():
        try:
            _, pm = read_plan(dest)
            ours = pm.get("format") == FORMAT
        except (CaptureError, OSError, ValueError):
            ours = False
        if not ours:
            raise CaptureError(
                f"{dest}: exists and is not a qgate capture; refusing to replace it (choose another --out)"
            )
    at = dest.parent if str(dest.parent) else Path(".")
    while not at.exists() and at != at.parent:
        at = at.parent
    if not at.is_dir():
        raise CaptureError(f"{at}: is not a directory (in --out {dest})")
    if not os.access(at, os.W_OK | os.X_OK):
        raise CaptureError(f"{at}: this process cannot create files here (--out {dest})")


def run_capture(args: argparse.Namespace, tmp_path: Path | None = None) -> Path:
    """Do the whole capture in this process. With `tmp_path` (worker mode) the file is left there complete
    for the supervisor to move into place."""
    dest = Path(args.out)
    plan, plan_meta = read_plan(args.plan)
    bundle = load_bundle(args.bundle)
    for w in bundle.warnings:
        warn(w)
    meta = build_metadata(args, bundle, plan, plan_meta)
    if args.driver == "python":
        return asyncio.run(_run_python(args, bundle, plan, meta, dest, tmp_path))
    return _run_llm_runner(args, bundle, plan, meta, dest)


def supervise(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the python driver in a child process (one process for the whole run); move its file into place
    only when it exits 0, report a crash (signal, non-zero exit) and discard the partial file otherwise."""
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = mkstemp_beside(dest)
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker-out", str(tmp_path)]
    rc = None
    try:
        try:
            rc = subprocess.run(cmd).returncode
        except KeyboardInterrupt:
            print("coreai_capture: interrupted; partial capture discarded", file=sys.stderr)
            return 130
        if rc == 0:
            try:
                _, pm = read_plan(tmp_path)
                if pm.get("format") != FORMAT:
                    raise CaptureError("worker output has no capture metadata")
            except CaptureError as e:
                print(f"coreai_capture: error: worker output unreadable ({e}); nothing written", file=sys.stderr)
                return EXIT_RUNTIME
            os.replace(tmp_path, dest)
            info(f"wrote {dest}")
            return EXIT_OK
        if rc < 0:
            try:
                sig = signal.Signals(-rc).name
            except ValueError:
                sig = f"signal {-rc}"
            print(
                f"coreai_capture: error: the Core AI runtime crashed (capture process killed by {sig}); "
                f"partial capture discarded, nothing written to {dest}",
                file=sys.stderr,
            )
            return EXIT_RUNTIME
        if rc not in (EXIT_USAGE, EXIT_RUNTIME):  # those two were reported by the worker itself
            print(
                f"coreai_capture: error: capture process exited with status {rc}; partial capture discarded, "
                f"nothing written to {dest}",
                file=sys.stderr,
            )
            return EXIT_RUNTIME
        return rc
    finally:
        tmp_path.unlink(missing_ok=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="coreai_capture.py",
        description="Capture a Core AI bundle's logits over a qgate plan as a qgate-capture/1 file.",
    )
    p.add_argument("--bundle", required=True, help="LanguageBundle directory (metadata.json + .aimodel/.aimodelc)")
    p.add_argument("--plan", required=True, help="qgate plan (.safetensors with seq.{i}.tokens)")
    p.add_argument("--out", required=True, help="output NAME.capture.safetensors")
    p.add_argument(
        "--compute", choices=["cpu", "gpu", "ane", "default"], default=None,
        help="python driver: specialization options (default cpu = SpecializationOptions.cpu_only(), the parity "
        "default; 'default' = SpecializationOptions.default(), for AOT .aimodelc)",
    )
    p.add_argument("--driver", choices=["python", "llm-runner"], default="python")
    p.add_argument("--rollout", type=int, default=16, help="greedy tokens after each sequence (default 16)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="store the K largest logits per row")
    g.add_argument("--full", action="store_true", help="store full logit rows (the default)")
    p.add_argument("--label", help="override the label parsed from the bundle name")
    p.add_argument(
        "--state-len", type=int, default=None,
        help="python driver: size of dynamic state dimensions (default: language.max_context_length)",
    )
    p.add_argument("--contract", help="python driver: JSON file with the function's inputs/outputs/states, "
                   "when the runtime's descriptor cannot be read")
    p.add_argument("--llm-runner", default=None, help="llm-runner executable (default: $LLM_RUNNER or PATH)")
    p.add_argument("--vocab-size", type=int, default=None, help="llm-runner driver: when metadata lacks it")
    p.add_argument(
        "--chunk-threshold", type=int, default=None,
        help="llm-runner driver: COREAI_CHUNK_THRESHOLD (default 1: one token per call; 0 leaves it unset)",
    )
    p.add_argument("--keep-runner-files", default=None, metavar="DIR",
                   help="llm-runner driver: keep the raw-token/logits JSON and logs in DIR")
    p.add_argument("--in-process", action="store_true",
                   help="python driver: run the runtime in this process (no crash supervision)")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.rollout < 0:
        p.error("--rollout must be >= 0")
    if a.top_k is not None and a.top_k < 1:
        p.error("--top-k must be >= 1")
    if a.driver == "llm-runner":
        if a.compute not in (None, "default"):
            p.error("--compute applies to the python driver; llm-runner picks its own compute units")
        a.compute = "llm-runner"
    elif a.compute is None:
        a.compute = "cpu"
    return a


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        if not args.worker_out:
            check_out(args)  # before the plan, the bundle and the runtime: nothing is lost, nothing is late
        if args.driver == "python" and not args.in_process and not args.worker_out:
            # fail fast on plan/bundle problems before starting the runtime process
            read_plan(args.plan)
            load_bundle(args.bundle)
            return supervise(args, argv)
        path = run_capture(args, Path(args.worker_out) if args.worker_out else None)
        if not args.worker_out:
            info(f"wrote {path}")
        return EXIT_OK
    except CaptureError as e:
        print(f"coreai_capture: error: {e}", file=sys.stderr)
        if isinstance(e, RuntimeFailure):
            print(f"coreai_capture: partial capture discarded, nothing written to {args.out}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("coreai_capture: interrupted; partial capture discarded", file=sys.stderr)
        return 130
    except Exception as e:  # the runtime raised: report as a runtime failure, nothing is written
        import traceback

        traceback.print_exc()
        print(f"coreai_capture: error: runtime failure ({type(e).__name__}: {e}); partial capture discarded",
              file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
