"""Atomic, verified checkpoints of named tensors plus JSON metadata, over safetensors.

A checkpoint is a directory ``<dir>/step_<step:08d>/`` holding

* ``tensors.safetensors``: a flat mapping of named tensors (keys like "params/host/fc1/weight"),
* ``manifest.json``: a `Manifest` with the step, the SHA-256 and size of every data file, the dtype
  and shape of every tensor, and the caller's JSON metadata.

`CheckpointManager.save` writes both files into a hidden ``.tmp-<step>-<random>/`` directory,
fsyncs them and the directory, then renames it into place in one `os.rename` and fsyncs the parent:
a crash at any point leaves either the old set of checkpoints or the new one, never a half-written
``step_*`` directory. Leftover ``.tmp-*`` directories are removed when a manager is created.
`restore` re-hashes every file and checks every tensor against the manifest before returning
anything. Nothing is pickled: safetensors and JSON only.

The manager stores any mapping of named tensors, and a training `State` directly:
``save(step, state, metadata)`` writes the state as ``state/<key>`` tensors (`state_to_tensors`, the
layout `esper_fn.run` uses) and `restore_state(host, step)` rebuilds it, verified against the host
(`state_from_tensors`: every key, shape and dtype, and no NaN or infinity). One process writes to a
directory at a time.

    mgr = CheckpointManager("ckpts")
    mgr.save(epoch, state, {"epoch": epoch})
    state, meta = mgr.restore_state(host)            # the latest step
    state, meta = mgr.restore_state(host, step=20)   # a given one
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from ._errors import CheckpointError, NonFiniteCheckpointError
from ._host import Host
from ._device import check_device
from ._serialize import state_from_tensors, state_to_tensors
from ._state import State

__all__ = [
    "CheckpointManager", "FileEntry", "Manifest", "NonFiniteCheckpointError", "TensorEntry", "state_from_tensors",
    "state_to_tensors",
]  # fmt: skip

STATE_PREFIX = "state/"
"""Key prefix of a `State`'s tensors in a checkpoint (``state/params/host/fc1/weight``); its
`state_to_tensors` metadata is stored under the metadata key "state"."""

SCHEMA_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"
TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"  # a checkpoint moved aside by save(overwrite=True)
_STEP_DIR = re.compile(r"step_(\d{8,})")
_OLD_DIR = re.compile(re.escape(_OLD_PREFIX) + r"(\d+)-[0-9a-f]+")

# dtype name (as stored in the manifest) -> torch dtype; all of these round-trip through safetensors.
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float64", "float32", "float16", "bfloat16", "complex64",
        "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool",
        "float8_e4m3fn", "float8_e5m2",
    )
    if hasattr(torch, name)
}  # fmt: skip


class _Strict(BaseModel):
    # NaN and inf in metadata are written as the JSON extensions NaN / Infinity, not as null.
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


class FileEntry(_Strict):
    """Integrity record of one data file in a checkpoint directory."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class TensorEntry(_Strict):
    """dtype (e.g. "float32") and shape of one stored tensor."""

    dtype: str
    shape: list[int]


class Manifest(_Strict):
    """The contents of ``manifest.json``.

    Attributes:
        schema_version: layout version of the checkpoint directory; 1.
        step: the training step the checkpoint belongs to.
        created: unix time in seconds at which it was written.
        files: file name (relative to the checkpoint directory) -> size and SHA-256.
        tensors: tensor key -> dtype and shape, in the order the tensors were given.
        metadata: the caller's JSON metadata.
    """

    schema_version: int = SCHEMA_VERSION
    step: int = Field(ge=0)
    created: float
    files: dict[str, FileEntry]
    tensors: dict[str, TensorEntry]
    metadata: dict[str, Any]


Expected = Mapping[str, tuple[Sequence[int], torch.dtype]]


class CheckpointManager:
    """Saves, lists, prunes and restores checkpoints in one directory.

    Args:
        directory: where the ``step_*`` directories live; created if missing.
        max_to_keep: after each save, keep only the newest `max_to_keep` steps (by step number),
            plus those kept by `keep_every_n`. None keeps everything.
        keep_every_n: also keep every step divisible by this, whatever its age. None disables it.

    On construction, leftovers of crashed saves are cleaned up: ``.tmp-*`` entries are removed, and
    a checkpoint moved aside by an interrupted ``save(..., overwrite=True)`` is put back if its
    replacement never landed (removed otherwise).

    Raises:
        CheckpointError: if `directory` exists and is not a directory, or an argument is invalid.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_to_keep: int | None = 3,
        keep_every_n: int | None = None,
    ) -> None:
        for arg, value in (("max_to_keep", max_to_keep), ("keep_every_n", keep_every_n)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise CheckpointError(f"{arg} must be None or an int >= 1, got {value!r}.")
        self.directory = Path(directory)
        self.max_to_keep = max_to_keep
        self.keep_every_n = keep_every_n
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} exists and is not a directory.")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._recover()

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({str(self.directory)!r}, max_to_keep={self.max_to_keep}, "
            f"keep_every_n={self.keep_every_n})"
        )

    # ----------------------------------------------------------------------------- listing

    def step_dir(self, step: int) -> Path:
        """The directory checkpoint `step` lives in (whether or not it exists)."""
        return self.directory / f"step_{step:08d}"

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints in the directory, ascending.

        A ``step_*`` directory counts when it holds a manifest; it is verified only by `restore`.
        """
        found = []
        for entry in self.directory.iterdir():
            m = _STEP_DIR.fullmatch(entry.name)
            if m and entry.is_dir() and (entry / MANIFEST_FILE).is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def latest_step(self) -> int | None:
        """The highest saved step, or None if there is no checkpoint."""
        steps = self.steps()
        return steps[-1] if steps else None

    # ----------------------------------------------------------------------------- saving

    def save(
        self,
        step: int,
        tensors: Mapping[str, Tensor] | State,
        metadata: Mapping[str, Any] | None = None,
        *,
        extra: Mapping[str, Tensor] | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write checkpoint `step` atomically, then apply the retention policy.

        Args:
            step: training step, an int >= 0.
            tensors: key -> dense tensor of any shape (0-d included) and a dtype safetensors stores
                (floats, ints, uints, bool, complex64, float8). Tensors on other devices are copied
                to the CPU; non-contiguous ones are packed. The inputs are not modified.
                Or a single (unstacked) `State`: its tensors are stored as ``state/<key>``
                (`state_to_tensors`) and its structure as ``metadata["state"]``; restore it with
                `restore_state`. This is the layout `esper_fn.run` writes.
            metadata: JSON data (str keys; dicts, lists, str, numbers, bool, None) that must come
                back unchanged, so tuples and non-str keys are refused. NaN and inf are kept (written
                as the JSON extensions ``NaN`` / ``Infinity``, which Python's json reads). None is {}.
                With a `State`, the key "state" is reserved.
            extra: with a `State` only: more tensors to store beside it (e.g. ``{"rng/data":
                generator.get_state()}``), keyed outside ``state/``; `restore` returns them.
            overwrite: replace an existing checkpoint of the same step. The old one stays in place
                until the new one is complete.

        Returns:
            The checkpoint directory ``<directory>/step_<step:08d>``. Retention never removes the
            checkpoint just written, even when its step is older than the newest `max_to_keep`.

        Raises:
            CheckpointError: if the step exists and `overwrite` is False, or a step, key, tensor or
                metadata value is invalid. Any error during writing leaves the directory as it was.
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CheckpointError(f"step must be an int >= 0, got {step!r}.")
        metadata = {} if metadata is None else metadata
        if isinstance(tensors, State):
            tensors, metadata = _state_entry(tensors, metadata, extra)
        elif extra is not None:
            raise CheckpointError("save: `extra` tensors go beside a State; with a mapping of tensors, put them in it.")
        flat = _prepare_tensors(tensors)
        meta = _check_metadata(metadata)
        final = self.step_dir(step)
        if final.exists() and not overwrite:
            raise CheckpointError(
                f"checkpoint for step {step} already exists at {final}. Pass overwrite=True to replace it, "
                f"or save under a new step."
            )

        tmp = self.directory / f"{TMP_PREFIX}{step}-{secrets.token_hex(4)}"
        aside: Path | None = None
        tmp.mkdir()
        try:
            tensors_path = tmp / TENSORS_FILE
            safetensors.torch.save_file(flat, str(tensors_path))
            _fsync_file(tensors_path)
            manifest = Manifest(
                step=step,
                created=time.time(),
                files={TENSORS_FILE: _file_entry(tensors_path)},
                tensors={
                    k: TensorEntry(dtype=_dtype_name(t.dtype), shape=list(t.shape)) for k, t in flat.items()
                },
                metadata=meta,
            )
            manifest_path = tmp / MANIFEST_FILE
            manifest_path.write_text(manifest.model_dump_json(indent=2), encoding="utf-8")
            _fsync_file(manifest_path)
            _fsync_dir(tmp)
            if final.exists():  # overwrite=True
                aside = self.directory / f"{_OLD_PREFIX}{step}-{secrets.token_hex(4)}"
                os.rename(final, aside)
            os.rename(tmp, final)
            _fsync_dir(self.directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if aside is not None and not final.exists():
                os.rename(aside, final)
            raise
        if aside is not None:
            shutil.rmtree(aside)
        self._apply_retention(just_saved=step)
        return final

    def _apply_retention(self, just_saved: int) -> None:
        steps = self.steps()
        keep = set(steps if self.max_to_keep is None else steps[-self.max_to_keep :])
        if self.keep_every_n is not None:
            keep |= {s for s in steps if s % self.keep_every_n == 0}
        keep.add(just_saved)
        for s in steps:
            if s not in keep:
                self._delete(s)

    def delete(self, step: int) -> None:
        """Remove checkpoint `step`.

        Raises:
            CheckpointError: if there is no such checkpoint (the message lists the available steps).
        """
        self._check_exists(step)
        self._delete(step)

    def _delete(self, step: int) -> None:
        # Rename first, so a crash during rmtree leaves a .tmp- leftover, not a step_ dir missing files.
        doomed = self.directory / f"{TMP_PREFIX}del-{step}-{secrets.token_hex(4)}"
        os.rename(self.step_dir(step), doomed)
        shutil.rmtree(doomed)

    def _recover(self) -> None:
        for entry in self.directory.iterdir():
            if entry.name.startswith(TMP_PREFIX):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            elif (m := _OLD_DIR.fullmatch(entry.name)) and entry.is_dir():
                final = self.step_dir(int(m.group(1)))
                if final.exists():
                    shutil.rmtree(entry)
                else:  # the overwrite was interrupted before its replacement landed
                    os.rename(entry, final)

    # ----------------------------------------------------------------------------- restoring

    def _check_exists(self, step: int) -> None:
        steps = self.steps()
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint for step {step!r} in {self.directory}; available steps: {steps or 'none'}."
            )

    def restore(
        self, step: int | None = None, expected: Expected | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Load and verify a checkpoint.

        Every file is re-hashed against the manifest, and every tensor's key, dtype and shape is
        checked against it, before anything is returned.

        Args:
            step: the step to restore; None means the latest.
            expected: optionally, key -> (shape, dtype) that the checkpoint must hold exactly, e.g.
                ``{"params/fc/weight": ((10, 40), torch.float32)}``; use it to check that a
                checkpoint fits the state it is restored into.

        Returns:
            (tensors, metadata): CPU tensors keyed as saved, in the order saved, owning their memory;
            and the metadata as saved.

        Raises:
            CheckpointError: if there is no checkpoint (or not that step: the message lists the
                available ones); if the manifest is unreadable or invalid; if a file is missing or
                its size or SHA-256 differs from the manifest (the message names the file and both
                hashes); if the stored tensors differ from the manifest; or if they differ from
                `expected` (the message lists every missing, unexpected and mismatched key).
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint to restore in {self.directory}: it holds no step_* directory.")
        self._check_exists(step)
        ckpt = self.step_dir(step)
        manifest = _read_manifest(ckpt / MANIFEST_FILE)
        if manifest.step != step:
            raise CheckpointError(
                f"{ckpt / MANIFEST_FILE} says step {manifest.step}, but its directory is for step {step}; "
                f"the directory was renamed or its manifest copied from elsewhere."
            )
        if TENSORS_FILE not in manifest.files:
            raise CheckpointError(f"{ckpt / MANIFEST_FILE} lists no {TENSORS_FILE}; files: {sorted(manifest.files)}.")

        contents: dict[str, bytes] = {}
        for name, entry in manifest.files.items():
            if name in ("", ".", "..", MANIFEST_FILE) or Path(name).name != name:
                raise CheckpointError(
                    f"{ckpt / MANIFEST_FILE} lists file {name!r}; entries must be plain file names in the "
                    f"checkpoint directory, other than the manifest itself."
                )
            path = ckpt / name
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise CheckpointError(f"{path} is listed in the manifest but missing.") from None
            if len(data) != entry.size:
                raise CheckpointError(
                    f"{path} has {len(data)} bytes, the manifest says {entry.size}: the file is truncated "
                    f"or was changed after saving."
                )
            digest = hashlib.sha256(data).hexdigest()
            if digest != entry.sha256:
                raise CheckpointError(
                    f"{path} is corrupt: SHA-256 is {digest}, the manifest says {entry.sha256}. Restore "
                    f"an older step (available: {self.steps()})."
                )
            contents[name] = data

        try:
            loaded = safetensors.torch.load(contents[TENSORS_FILE])
        except safetensors.SafetensorError as err:  # only reachable if the manifest was rewritten too
            raise CheckpointError(f"{ckpt / TENSORS_FILE} is not a valid safetensors file: {err}") from None
        _check_against_manifest(loaded, manifest, ckpt / TENSORS_FILE)
        tensors = {k: loaded[k] for k in manifest.tensors}
        if expected is not None:
            _check_expected(tensors, expected, ckpt)
        return tensors, dict(manifest.metadata)


    def restore_state(self, host: Host, step: int | None = None, *, device: torch.device | str | None = None
                      ) -> tuple[State, dict[str, Any]]:
        """Load, verify and rebuild a `State` saved with ``save(step, state, metadata)`` (or by
        `esper_fn.run.grow`).

        The checkpoint is verified as `restore` does (hashes, manifest), then the state against
        `host` as `state_from_tensors` does: every tensor the state needs is present with the shape
        and dtype the host and blueprints give it, nothing else is there, the slot records are
        possible, and no parameter, buffer or optimizer moment is NaN or infinite.

        To resume from the latest checkpoint without non-finite values (a run that diverged just
        before it was saved), walk back through `steps`::

            for step in reversed(mgr.steps()):
                try:
                    state, meta = mgr.restore_state(host, step)
                    break
                except NonFiniteCheckpointError as err:  # err.key names the tensor
                    print(f"step {step} holds a non-finite {err.key}; trying an earlier one")

        Args:
            host: the host the state was made with.
            step: the step to restore; None means the latest.
            device: where the restored state lives ("cpu", "cuda", ...); None: the CPU. A state
                saved from any device restores onto any other (checkpoints hold CPU tensors), in
                the dtype it was saved in.

        Returns:
            ``(state, metadata)``: the state, and the metadata saved with it (without its "state"
            entry). Tensors saved with ``extra`` are read with `restore`.

        Raises:
            CheckpointError: as `restore`; the checkpoint holds no State; or it does not fit `host`
                (the message names the tensor, the expected and the found shape and dtype).
            NonFiniteCheckpointError: a parameter, buffer or optimizer moment is NaN or infinite.
            ConfigError, CapabilityError: `device` is not a device, or not one this machine has
                (checked before anything is read).
        """
        device = check_device(device, "restore_state")
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint to restore in {self.directory}: it holds no step_* directory.")
        tensors, meta = self.restore(step)
        where = str(self.step_dir(step))
        if "state" not in meta:
            raise CheckpointError(f"checkpoint {where} holds no State (it was saved from a mapping of tensors, whose "
                                  "metadata has no 'state' entry); read it with `restore`.")
        n = len(STATE_PREFIX)
        state = state_from_tensors(host, {k[n:]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)},
                                   meta["state"], source=f"checkpoint {where}")
        if device is not None:
            state = state.to(device)
        return state, {k: v for k, v in meta.items() if k != "state"}


# --------------------------------------------------------------------------------- helpers


def _state_entry(state: State, metadata: Mapping[str, Any], extra: Mapping[str, Tensor] | None
                 ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and metadata that store `state` (and `extra` tensors) in one checkpoint."""
    if not isinstance(metadata, Mapping):
        raise CheckpointError(f"metadata must be a mapping with str keys, got {type(metadata).__name__}.")
    if "state" in metadata:
        raise CheckpointError("save: the metadata key 'state' is reserved for the State's structure; rename yours.")
    flat, state_meta = state_to_tensors(state)
    tensors = {STATE_PREFIX + k: v for k, v in flat.items()}
    for k, v in (extra or {}).items():
        if not isinstance(k, str) or k.startswith(STATE_PREFIX):
            raise CheckpointError(f"save: extra tensor key {k!r} must be a str outside {STATE_PREFIX!r}, which holds "
                                  "the State.")
        tensors[k] = v
    return tensors, {"state": state_meta, **metadata}



def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _prepare_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Validate keys and tensors; return CPU, contiguous tensors that share no storage."""
    if not isinstance(tensors, Mapping):
        raise CheckpointError(f"tensors must be a mapping of str -> Tensor, got {type(tensors).__name__}.")
    out: dict[str, Tensor] = {}
    seen_storage: set[int] = set()
    for key, t in tensors.items():
        if not isinstance(key, str) or not key or key == "__metadata__":
            raise CheckpointError(
                f"tensor key {key!r} is invalid: keys must be non-empty strings other than '__metadata__' "
                f"(which safetensors reserves), e.g. 'params/host/fc1/weight'."
            )
        if not isinstance(t, Tensor):
            raise CheckpointError(f"tensors[{key!r}] is a {type(t).__name__}, not a torch.Tensor.")
        if t.layout != torch.strided:
            raise CheckpointError(f"tensors[{key!r}] has layout {t.layout}; convert it with `.to_dense()` first.")
        if _dtype_name(t.dtype) not in _DTYPES:
            raise CheckpointError(
                f"tensors[{key!r}] has dtype {t.dtype}, which safetensors cannot store; supported: {sorted(_DTYPES)}."
            )
        t = t.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (views of one buffer, tied weights): copy those.
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen_storage:
            t = t.clone()
        elif t.numel():
            seen_storage.add(ptr)
        out[key] = t
    return out


def _check_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(metadata, Mapping):
        raise CheckpointError(f"metadata must be a mapping with str keys, got {type(metadata).__name__}.")
    meta = dict(metadata)
    try:
        text = json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"metadata is not JSON data ({err}). Use dicts with str keys, lists, str, numbers, bool and None; "
            f"convert tensors with `.tolist()`."
        ) from None
    if not _same_json(json.loads(text), meta):
        raise CheckpointError(
            "metadata would not come back unchanged from JSON (tuples become lists, non-str keys become "
            "str): convert them before saving."
        )
    return meta


def _same_json(a: Any, b: Any) -> bool:
    """Equality of JSON values with exact types, where NaN equals NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return bool(a == b)


def _file_entry(path: Path) -> FileEntry:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return FileEntry(sha256=h.hexdigest(), size=size)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_manifest(path: Path) -> Manifest:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing.") from None
    try:
        manifest = Manifest.model_validate_json(text)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<file>'}: {e['msg']}" for e in err.errors())
        raise CheckpointError(f"{path} is not a valid checkpoint manifest ({problems}).") from None
    if manifest.schema_version != SCHEMA_VERSION:
        raise CheckpointError(
            f"{path} has schema_version {manifest.schema_version}; this esper_fn reads version {SCHEMA_VERSION}."
        )
    return manifest


def _check_against_manifest(loaded: Mapping[str, Tensor], manifest: Manifest, path: Path) -> None:
    missing = sorted(set(manifest.tensors) - set(loaded))
    extra = sorted(set(loaded) - set(manifest.tensors))
    if missing or extra:
        raise CheckpointError(
            f"{path} does not hold the tensors its manifest lists: missing keys {missing}, unlisted keys {extra}."
        )
    for key, entry in manifest.tensors.items():
        t = loaded[key]
        if _dtype_name(t.dtype) != entry.dtype or list(t.shape) != entry.shape:
            raise CheckpointError(
                f"tensor {key!r} in {path} is {_dtype_name(t.dtype)} {list(t.shape)}, but the manifest says "
                f"{entry.dtype} {entry.shape}."
            )


def _check_expected(tensors: Mapping[str, Tensor], expected: Expected, ckpt: Path) -> None:
    problems = []
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing keys {missing}")
    if extra:
        problems.append(f"unexpected keys {extra}")
    for key in expected:
        if key not in tensors:
            continue
        shape, dtype = expected[key]
        t = tensors[key]
        if tuple(t.shape) != tuple(shape):
            problems.append(f"{key!r}: shape {tuple(t.shape)}, expected {tuple(shape)}")
        if t.dtype != dtype:
            problems.append(f"{key!r}: dtype {t.dtype}, expected {dtype}")
    if problems:
        raise CheckpointError(
            f"checkpoint {ckpt} does not match the expected tensors: " + "; ".join(problems) + ". "
            "It was probably saved from a differently shaped state (another host, or other seeds grafted)."
        )

