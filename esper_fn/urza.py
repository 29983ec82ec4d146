"""Urza: a library of trained seeds that later runs can reuse.

A library is a directory::

    <library>/index.sqlite                    one row per stored seed (SQLite in WAL mode)
    <library>/artifacts/<sha256>.safetensors  the seed's tensors, named by the file's SHA-256

A row records what the seed is and where it came from: blueprint id and version, the slot's name,
kind, shape and full spec, the host, the task, its fate (FOSSILIZED or PRUNED), its measured
contribution, how many epochs it trained, the run id, and the size, SHA-256, names, dtypes and
shapes of its artifact. `Library.load` re-hashes the artifact on every load and checks its tensors
against the row before returning anything; a missing, truncated or altered artifact is a
`LibraryError` naming the entry and the file.

Writes are safe under concurrency: each `put` holds SQLite's write lock (``BEGIN IMMEDIATE``, with
a busy timeout) while it writes the artifact (to a temporary file, fsynced, then renamed into
place) and inserts the row, so two runs writing one library at once serialise and lose nothing, and
`gc` (which takes the same lock) never sees a half-stored seed. Identical tensors are stored once.
Nothing is pickled: safetensors, JSON and SQLite only.

Generated blueprints (`esper_fn.karn`) live in the same index, in two more tables that any version
of the index gains when it is opened (the schema is additive: version 1 libraries stay readable by
older esper_fn, which ignores the tables)::

    blueprints  one row per generated blueprint kept as a winner (`BlueprintRecord`): its id, the
                family, the family's version and code fingerprint, its parameters and placement,
                its Tezzeret characterisation and the score that chose it
    outcomes    one row per measured outcome of a blueprint (`OutcomeRecord`): where it was grafted,
                what it contributed (validation accuracy gained over the same runs without it) and
                what it cost (parameters added), on which runs (the `context` key)

Warm start: ``esper_fn.urza.warm_start(state, slot, ID, library=PATH)`` grafts a stored seed's
trained weights instead of a fresh draw (see `fit`). The seed still enters at alpha 0, so the
network's function is unchanged at germination; the weights it brings matter once it blends in.

Importing this module does not import torch (the `esper-fn library` commands list, show, verify
and collect garbage without it); storing and loading tensors do.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import secrets
import sqlite3
import struct
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ._errors import (BlueprintError, CapabilityError, GraftError, LibraryError, LibraryNotFoundError, SeedNotFoundError,
                      WarmStartError)

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from ._blueprint import Blueprint
    from ._host import SlotSpec
    from ._state import State

__all__ = [
    "FATES",
    "BlueprintRecord",
    "GCReport",
    "Library",
    "OutcomeRecord",
    "Problem",
    "SeedArtifact",
    "SeedRecord",
    "TensorInfo",
    "fit",
    "resolve",
    "warm_start",
]

SCHEMA_VERSION = 1
INDEX_FILE = "index.sqlite"
ARTIFACTS_DIR = "artifacts"
TMP_PREFIX = ".tmp-"
ARTIFACT_FORMAT = "esper_fn.urza/1"
FATES: tuple[str, ...] = ("FOSSILIZED", "PRUNED")
"""What became of a stored seed in the run that trained it."""

_BUSY_TIMEOUT_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS seeds (
    id TEXT PRIMARY KEY,
    blueprint TEXT NOT NULL,
    blueprint_name TEXT NOT NULL,
    blueprint_version TEXT NOT NULL,
    slot TEXT NOT NULL,
    slot_kind TEXT NOT NULL,
    slot_shape TEXT NOT NULL,
    slot_spec TEXT NOT NULL,
    host TEXT NOT NULL,
    host_config TEXT NOT NULL,
    task TEXT,
    fate TEXT NOT NULL CHECK (fate IN ('FOSSILIZED', 'PRUNED')),
    contribution REAL,
    epochs INTEGER,
    run_id TEXT,
    seed_index INTEGER,
    n_params INTEGER NOT NULL,
    tensors TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    torch_version TEXT NOT NULL,
    esper_version TEXT NOT NULL,
    UNIQUE (run_id, seed_index, fate)
);
CREATE INDEX IF NOT EXISTS seeds_blueprint ON seeds (blueprint);
CREATE INDEX IF NOT EXISTS seeds_sha256 ON seeds (sha256);
CREATE TABLE IF NOT EXISTS blueprints (
    id TEXT PRIMARY KEY,
    family TEXT NOT NULL,
    family_version TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    params TEXT NOT NULL,
    placement TEXT,
    description TEXT NOT NULL,
    score TEXT NOT NULL,
    characterisation TEXT NOT NULL,
    source TEXT,
    created REAL NOT NULL,
    esper_version TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outcomes (
    id TEXT PRIMARY KEY,
    blueprint TEXT NOT NULL,
    placement TEXT NOT NULL,
    context TEXT NOT NULL,
    study TEXT,
    trial INTEGER,
    val_accuracy REAL NOT NULL,
    contribution REAL,
    added_params REAL NOT NULL,
    params_ratio REAL NOT NULL,
    runs INTEGER NOT NULL,
    seconds REAL,
    created REAL NOT NULL,
    UNIQUE (study, trial)
);
CREATE INDEX IF NOT EXISTS outcomes_context ON outcomes (context);
"""

_BP_COLUMNS = ("id", "family", "family_version", "fingerprint", "params", "placement", "description", "score",
               "characterisation", "source", "created", "esper_version")
_BP_JSON = ("params", "score", "characterisation")
_OUT_COLUMNS = ("id", "blueprint", "placement", "context", "study", "trial", "val_accuracy", "contribution",
                "added_params", "params_ratio", "runs", "seconds", "created")

_COLUMNS = ("id", "blueprint", "blueprint_name", "blueprint_version", "slot", "slot_kind", "slot_shape", "slot_spec",
            "host", "host_config", "task", "fate", "contribution", "epochs", "run_id", "seed_index", "n_params",
            "tensors", "sha256", "size", "created", "torch_version", "esper_version")
_JSON_COLUMNS = ("slot_shape", "slot_spec", "host_config", "tensors")

# safetensors dtype codes -> bytes per element (the header parser checks data offsets with these).
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


# --------------------------------------------------------------------------------- contracts


class TensorInfo(BaseModel):
    """One tensor of an artifact, as its safetensors header states it ("F32", [16, 1, 5])."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: str
    shape: list[int]


class SeedRecord(BaseModel):
    """One stored seed: what it is, where it came from, and its artifact's fingerprint.

    Attributes:
        id: the entry's id (16 hex digits); commands accept any unique prefix.
        blueprint: the blueprint id, "name@x.y.z"; blueprint_name / blueprint_version split it.
        slot: the slot it was trained at; slot_kind and slot_shape (per sample) describe it, and
            slot_spec holds the whole `SlotSpec` as JSON.
        host: the host it was trained in (a preset name such as "mlp-impaired", or the host's own
            name); host_config its constructor arguments.
        task: the task it was trained on, or None.
        fate: "FOSSILIZED" or "PRUNED".
        contribution: its measured counterfactual contribution (accuracy points in [-1, 1]) when it
            was stored, or None.
        epochs: epochs it trained before it was stored (germination to fossilization), or None.
        run_id, seed_index: the run and the seed's number in it (together unique per fate).
        n_params: trainable parameters.
        tensors: ``{"params/<name>" | "buffers/<name>": TensorInfo}`` of the artifact.
        sha256, size: the artifact's SHA-256 (also its file name) and its size in bytes.
        created: unix time of storing; torch_version, esper_version: the versions that stored it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    blueprint: str
    blueprint_name: str
    blueprint_version: str
    slot: str
    slot_kind: str
    slot_shape: list[int]
    slot_spec: dict[str, Any]
    host: str
    host_config: dict[str, Any] = Field(default_factory=dict)
    task: str | None = None
    fate: Literal["FOSSILIZED", "PRUNED"]
    contribution: float | None = None
    epochs: int | None = None
    run_id: str | None = None
    seed_index: int | None = None
    n_params: int
    tensors: dict[str, TensorInfo]
    sha256: str
    size: int
    created: float
    torch_version: str
    esper_version: str


class BlueprintRecord(BaseModel):
    """A generated blueprint kept in the library (`esper_fn.karn` writes them; `esper_fn.karn.load`
    registers them again in a later process).

    Attributes:
        id: the blueprint id, "karn_<family>_<parameters>@<family version>".
        family: the family that generated it; family_version: its version (the id's version).
        fingerprint: SHA-256 of the family's code when it was generated. One id is stored with one
            fingerprint: code that changes must come with a new family version.
        params: the family parameters (``{"kernel": 7, "dilation": 2, "hidden": 4}``).
        placement: where it was chosen to be grafted ("input", "first", "last"), or None.
        description: one line, as in the catalogue.
        score: how it was chosen (e.g. ``{"objective": ..., "val_accuracy": ..., "params_ratio": ...}``).
        characterisation: Tezzeret's measurements at the slots it was chosen for
            (`esper_fn.tezzeret.Characterisation` dumps).
        source: what chose it (e.g. the search's study name and directory), or None.
        created: unix time of storing; esper_version: the version that stored it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    family: str
    family_version: str
    fingerprint: str
    params: dict[str, int | float | str]
    placement: str | None = None
    description: str
    score: dict[str, float] = Field(default_factory=dict)
    characterisation: list[dict[str, Any]] = Field(default_factory=list)
    source: str | None = None
    created: float
    esper_version: str


class OutcomeRecord(BaseModel):
    """One measured outcome of a blueprint: what grafting it at a placement gave on a set of runs.

    Attributes:
        id: the entry's id (16 hex digits).
        blueprint: the blueprint id.
        placement: where it was grafted ("input", "first", "last", or a slot name).
        context: what the runs were, as a key: outcomes with equal contexts are comparable (same
            instances, seeds and protocol).
        study, trial: the search that measured it and the trial's number (together unique), or None.
        val_accuracy: mean final validation accuracy over the runs.
        contribution: mean validation accuracy gained over the same runs without the seed (paired by
            run), or None where that was not measured.
        added_params: mean parameters the grown network has beyond its host (the cost).
        params_ratio: mean final parameters over the host's.
        runs: how many runs the means are over.
        seconds: wall time of the measurement, or None.
        created: unix time of storing.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    blueprint: str
    placement: str
    context: str
    study: str | None = None
    trial: int | None = None
    val_accuracy: float
    contribution: float | None = None
    added_params: float
    params_ratio: float
    runs: int = Field(ge=1)
    seconds: float | None = None
    created: float

    @property
    def per_param(self) -> float | None:
        """Contribution per added parameter (None where the contribution is unknown or nothing was added)."""
        if self.contribution is None or self.added_params <= 0:
            return None
        return self.contribution / self.added_params


@dataclass(frozen=True)
class SeedArtifact:
    """A verified stored seed: its record and its tensors (CPU, owning their memory).

    Attributes:
        record: the index row.
        params: ``{name: tensor}`` as the blueprint's ``init`` names them ("w1", "b1", ...).
        buffers: the seed's buffers, same naming (empty for most blueprints).
    """

    record: SeedRecord
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]


class Problem(BaseModel):
    """One thing `Library.verify` found wrong.

    Attributes:
        id: the entry concerned, or None for a file that no entry references.
        path: the file concerned.
        reason: what is wrong, in words.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None
    path: str
    reason: str


class GCReport(BaseModel):
    """What `Library.gc` removed (or would remove, with ``dry_run``).

    Attributes:
        orphans: artifact files no entry references.
        leftovers: temporary files of writes that never finished (a crashed writer).
        dropped: ids of entries removed because their artifact is missing or corrupt (``drop_bad``).
        freed_bytes: bytes of the files removed.
        dry_run: nothing was removed.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    orphans: list[str]
    leftovers: list[str]
    dropped: list[str]
    freed_bytes: int
    dry_run: bool


# --------------------------------------------------------------------------------- the library


def _wal(con: sqlite3.Connection) -> str:
    """Switch the index to WAL mode and return the journal mode it reports. Processes opening a new
    library at once race for the lock that switch needs, and SQLite answers "database is locked"
    there without waiting on its busy timeout: retry until the timeout instead."""
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    while True:
        try:
            mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
            continue
        if str(mode).lower() == "wal" or time.monotonic() > deadline:
            return mode
        time.sleep(0.02)


class Library:
    """A seed library at `path` (see the module docstring for its layout).

    One `Library` object opens a fresh SQLite connection per operation, so it may be shared across
    threads and survives a fork; any number of processes may use one library at once.

    Args:
        path: the library directory.
        create: create the directory and its index if absent (the default). With False, a missing
            library is a `LibraryError` (the read-only commands use this, so a typo never leaves an
            empty library behind).

    Raises:
        LibraryError: the library is missing (``create=False``), its index is not an SQLite file, or
            it was written by an incompatible schema version.
    """

    def __init__(self, path: str | os.PathLike, *, create: bool = True):
        self.path = Path(path)
        self.index_path = self.path / INDEX_FILE
        self.artifacts_dir = self.path / ARTIFACTS_DIR
        if not self.index_path.exists():
            if not create:
                raise LibraryNotFoundError(
                    f"no seed library at {self.path}: {self.index_path} does not exist. Create one with "
                    f"`esper_fn.urza.Library(path)` or `esper-fn grow --library {self.path}`.")
            try:
                self.artifacts_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise LibraryError(f"cannot create the seed library at {self.path}: {e}") from None
        self._init_schema()

    def __repr__(self) -> str:
        return f"Library({str(self.path)!r})"

    # -- connections -----------------------------------------------------------------------------
    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            con = sqlite3.connect(self.index_path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as e:
            raise LibraryError(f"cannot open the library index {self.index_path}: {e}") from None
        try:
            con.execute("PRAGMA synchronous=FULL")
            yield con
        except sqlite3.DatabaseError as e:
            raise LibraryError(
                f"the library index {self.index_path} could not be read or written ({e}). If it is corrupt, "
                "restore it from a backup; its artifacts are intact files named by their SHA-256.") from None
        finally:
            con.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: SQLite's write lock is held from the start (one writer at a time)."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def _init_schema(self) -> None:
        with self._connect() as con:
            mode = _wal(con)
            if str(mode).lower() != "wal":
                raise LibraryError(f"{self.index_path}: SQLite refused WAL mode (got {mode!r}); concurrent writers "
                                   "need it. Is the library on a network file system?")
            con.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        con.execute(statement)
                row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is None:
                    con.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif row[0] != str(SCHEMA_VERSION):
                    raise LibraryError(f"{self.index_path} has schema version {row[0]}; this esper_fn reads version "
                                       f"{SCHEMA_VERSION}.")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # -- writing ---------------------------------------------------------------------------------
    def put(
        self,
        params: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor] | None = None,
        *,
        blueprint: str,
        spec: SlotSpec,
        host: str,
        fate: str = "FOSSILIZED",
        task: str | None = None,
        contribution: float | None = None,
        epochs: int | None = None,
        run_id: str | None = None,
        seed_index: int | None = None,
        host_config: Mapping[str, Any] | None = None,
    ) -> SeedRecord:
        """Store one seed's tensors and record.

        Args:
            params: the seed's parameters by name (float tensors, e.g. "w1" [16, 1, 5]).
            buffers: the seed's buffers by name, if any.
            blueprint: the blueprint id ("conv1d_k5@1.0.0").
            spec: the slot the seed was trained at.
            host: the host it was trained in (a preset name, or the host's name).
            fate: "FOSSILIZED" or "PRUNED".
            task, contribution, epochs, run_id, seed_index, host_config: provenance (see `SeedRecord`).

        Returns:
            The new record; or, when this run already stored this seed with this fate (a resumed run
            redoing an epoch), the existing record.

        Raises:
            LibraryError: the artifact or the index could not be written (nothing is recorded then).
            GraftError: a tensor name or value is invalid, or `fate` is not one of `FATES`.
        """
        import safetensors.torch
        import torch

        from . import __version__

        if fate not in FATES:
            raise GraftError(f"fate must be one of {FATES}, got {fate!r}.")
        flat: dict[str, torch.Tensor] = {}
        for prefix, group in (("params", params), ("buffers", buffers or {})):
            for name, t in group.items():
                if not isinstance(name, str) or not name or "/" in name:
                    raise GraftError(f"seed tensor name {name!r} is invalid: use a non-empty name without '/'.")
                if not isinstance(t, torch.Tensor):
                    raise GraftError(f"seed tensor {name!r} is a {type(t).__name__}, not a torch.Tensor.")
                flat[f"{prefix}/{name}"] = t.detach().to("cpu").contiguous().clone()
        if not flat:
            raise GraftError("put: the seed has no tensors to store.")
        # One metadata key: safetensors writes a metadata map in hash order, and equal seeds must give
        # equal bytes (the file is named by its SHA-256).
        data = safetensors.torch.save(flat, metadata={"format": ARTIFACT_FORMAT})
        header = _parse_header(data, "the artifact being written")
        sha = hashlib.sha256(data).hexdigest()
        name, version = blueprint.split("@", 1) if "@" in blueprint else (blueprint, "")
        rec = SeedRecord(
            id=uuid.uuid4().hex[:16], blueprint=blueprint, blueprint_name=name, blueprint_version=version,
            slot=spec.name, slot_kind=spec.kind, slot_shape=list(spec.shape), slot_spec=_spec_json(spec),
            host=host, host_config=json.loads(json.dumps(dict(host_config or {}))), task=task, fate=fate,
            contribution=None if contribution is None else float(contribution),
            epochs=None if epochs is None else int(epochs), run_id=run_id,
            seed_index=None if seed_index is None else int(seed_index),
            n_params=sum(int(t.numel()) for t in (params or {}).values()),
            tensors={k: TensorInfo(dtype=header[k][0], shape=header[k][1]) for k in flat}, sha256=sha, size=len(data),
            created=time.time(), torch_version=torch.__version__, esper_version=__version__,
        )
        with self._write() as con:
            if run_id is not None and seed_index is not None:
                row = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM seeds WHERE run_id = ? AND seed_index = ? "
                                  "AND fate = ?", (run_id, seed_index, fate)).fetchone()
                if row is not None:
                    return _record(row)
            self._write_artifact(sha, data)
            values = [getattr(rec, c) for c in _COLUMNS]
            values = [json.dumps(v if c != "tensors" else {k: t.model_dump() for k, t in rec.tensors.items()})
                      if c in _JSON_COLUMNS else v for c, v in zip(_COLUMNS, values)]
            con.execute(f"INSERT INTO seeds ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                        values)
        return rec

    def _write_artifact(self, sha: str, data: bytes) -> None:
        """Write ``artifacts/<sha>.safetensors`` atomically (caller holds the write lock). An intact
        copy is kept; a damaged one is replaced by the good bytes."""
        final = self.artifact_path(sha)
        if final.exists() and _file_sha256(final) == sha:
            return
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.artifacts_dir / f"{TMP_PREFIX}{sha[:16]}-{secrets.token_hex(4)}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(self.artifacts_dir)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise LibraryError(f"cannot write artifact {final}: {e}") from None

    def store_seed(
        self,
        state: State,
        slot: str,
        *,
        fate: str = "FOSSILIZED",
        host: str | None = None,
        task: str | None = None,
        contribution: float | None = None,
        epochs: int | None = None,
        run_id: str | None = None,
    ) -> SeedRecord:
        """Store the seed at `slot` of `state` (call it just before `fossilize` or `prune`, while
        the seed's own parameters still exist: a mergeable seed is folded into the host by
        `fossilize`, a pruned one is dropped).

        Args:
            state: a single (unstacked) state with a seed at `slot`.
            slot: the slot.
            fate: "FOSSILIZED" or "PRUNED".
            host: the host's label (default ``state.host.name``).
            task, contribution, epochs, run_id: provenance; the seed's number in the run
                (``state.slots["seed_id"]``) is recorded as ``seed_index``.

        Raises:
            GraftError: the state is stacked or the slot holds no seed.
            LibraryError: writing failed.
        """
        if state.batch:
            raise GraftError(f"store_seed: the state is stacked (batch {state.batch}); store each host's seed from "
                             "`esper_fn.unstack(state)`.")
        i = state.index(slot)
        bid = state.blueprints[i]
        if bid is None:
            raise GraftError(f"store_seed: slot {slot!r} holds no seed (stage {state.stage(slot).name}); store a "
                             "seed before fossilizing a mergeable one or pruning it.")
        buffers = {k[2]: v for k, v in state.buffers_flat.items() if k[0] == "seeds" and k[1] == slot}
        return self.put(state.seed_params(slot), buffers, blueprint=bid, spec=state.spec(slot),
                        host=host or state.host.name, host_config=dict(state.host.config), fate=fate, task=task,
                        contribution=contribution, epochs=epochs, run_id=run_id,
                        seed_index=int(state.slots["seed_id"][i]))

    # -- generated blueprints and outcomes ---------------------------------------------------------
    def put_blueprint(self, record: BlueprintRecord) -> BlueprintRecord:
        """Store a generated blueprint's record, replacing an earlier record of the same id (a later
        search that chose it again; its score and characterisation are the newer ones).

        Raises:
            LibraryError: the id is stored with another code fingerprint (the family's code changed
                and its version did not: bump the family's version), or the index cannot be written.
        """
        if not isinstance(record, BlueprintRecord):
            raise LibraryError(f"put_blueprint: expected a BlueprintRecord, got {type(record).__name__}.")
        with self._write() as con:
            row = con.execute("SELECT fingerprint FROM blueprints WHERE id = ?", (record.id,)).fetchone()
            if row is not None and row[0] != record.fingerprint:
                raise LibraryError(
                    f"{self.path} already holds blueprint {record.id!r} generated by other code (fingerprint "
                    f"{row[0][:12]} vs {record.fingerprint[:12]}): the {record.family!r} family changed without a "
                    "version bump. Bump the family's version (the id changes with it).")
            values = [json.dumps(getattr(record, c)) if c in _BP_JSON else getattr(record, c) for c in _BP_COLUMNS]
            con.execute(f"INSERT OR REPLACE INTO blueprints ({', '.join(_BP_COLUMNS)}) "
                        f"VALUES ({', '.join('?' * len(_BP_COLUMNS))})", values)
        return record

    def blueprint_records(self, *, family: str | None = None) -> list[BlueprintRecord]:
        """The generated blueprints stored here, oldest first (optionally one family's)."""
        sql, args = f"SELECT {', '.join(_BP_COLUMNS)} FROM blueprints", []
        if family is not None:
            sql, args = sql + " WHERE family = ?", [family]
        with self._connect() as con:
            rows = con.execute(sql + " ORDER BY created, id", args).fetchall()
        out = []
        for r in rows:
            d = dict(zip(_BP_COLUMNS, r))
            for c in _BP_JSON:
                d[c] = json.loads(d[c])
            out.append(BlueprintRecord.model_validate(d))
        return out

    def remove_blueprint(self, blueprint_id: str) -> BlueprintRecord:
        """Remove a generated blueprint's record.

        Raises:
            SeedNotFoundError: no such record (the message lists the stored ids).
        """
        recs = {r.id: r for r in self.blueprint_records()}
        if blueprint_id not in recs:
            raise SeedNotFoundError(f"no generated blueprint {blueprint_id!r} in library {self.path}; it holds "
                                    f"{sorted(recs) or 'none'}.")
        with self._write() as con:
            con.execute("DELETE FROM blueprints WHERE id = ?", (blueprint_id,))
        return recs[blueprint_id]

    def put_outcome(
        self,
        *,
        blueprint: str,
        placement: str,
        context: str,
        val_accuracy: float,
        added_params: float,
        params_ratio: float,
        runs: int,
        contribution: float | None = None,
        study: str | None = None,
        trial: int | None = None,
        seconds: float | None = None,
    ) -> OutcomeRecord:
        """Record one measured outcome of a blueprint (see `OutcomeRecord` for the fields).

        Returns:
            The new record; or, when this study already recorded this trial (a resumed search
            redoing it), the existing record.

        Raises:
            LibraryError: the index cannot be written.
        """
        rec = OutcomeRecord(id=uuid.uuid4().hex[:16], blueprint=blueprint, placement=placement, context=context,
                            study=study, trial=trial, val_accuracy=float(val_accuracy),
                            contribution=None if contribution is None else float(contribution),
                            added_params=float(added_params), params_ratio=float(params_ratio), runs=int(runs),
                            seconds=None if seconds is None else float(seconds), created=time.time())
        with self._write() as con:
            if study is not None and trial is not None:
                row = con.execute(f"SELECT {', '.join(_OUT_COLUMNS)} FROM outcomes WHERE study = ? AND trial = ?",
                                  (study, trial)).fetchone()
                if row is not None:
                    return OutcomeRecord.model_validate(dict(zip(_OUT_COLUMNS, row)))
            con.execute(f"INSERT INTO outcomes ({', '.join(_OUT_COLUMNS)}) VALUES ({', '.join('?' * len(_OUT_COLUMNS))})",
                        [getattr(rec, c) for c in _OUT_COLUMNS])
        return rec

    def outcomes(self, *, context: str | None = None, blueprint: str | None = None) -> list[OutcomeRecord]:
        """Recorded outcomes, oldest first, optionally of one context or blueprint id."""
        where, args = [], []
        for col, val in (("context", context), ("blueprint", blueprint)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        sql = f"SELECT {', '.join(_OUT_COLUMNS)} FROM outcomes" + (" WHERE " + " AND ".join(where) if where else "")
        with self._connect() as con:
            rows = con.execute(sql + " ORDER BY created, id", args).fetchall()
        return [OutcomeRecord.model_validate(dict(zip(_OUT_COLUMNS, r))) for r in rows]

    # -- reading ---------------------------------------------------------------------------------
    def artifact_path(self, sha256: str) -> Path:
        """Where the artifact with this SHA-256 lives."""
        return self.artifacts_dir / f"{sha256}.safetensors"

    def records(
        self,
        *,
        blueprint: str | None = None,
        task: str | None = None,
        host: str | None = None,
        run_id: str | None = None,
        fate: str | None = None,
    ) -> list[SeedRecord]:
        """Stored seeds, oldest first, optionally filtered (a bare blueprint name matches every
        version; "name@x.y.z" one version)."""
        where, args = [], []
        if blueprint is not None:
            where.append("blueprint = ?" if "@" in blueprint else "blueprint_name = ?")
            args.append(blueprint)
        for col, val in (("task", task), ("host", host), ("run_id", run_id), ("fate", fate)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        sql = f"SELECT {', '.join(_COLUMNS)} FROM seeds"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._connect() as con:
            rows = con.execute(sql + " ORDER BY created, id", args).fetchall()
        return [_record(r) for r in rows]

    def __len__(self) -> int:
        with self._connect() as con:
            return int(con.execute("SELECT COUNT(*) FROM seeds").fetchone()[0])

    def get(self, seed_id: str) -> SeedRecord:
        """The record with id `seed_id` (or the one id starting with it).

        Raises:
            SeedNotFoundError: no entry, or the prefix matches several (the message lists them).
        """
        if not isinstance(seed_id, str) or not seed_id:
            raise SeedNotFoundError(f"a stored seed is named by its id (hex digits), got {seed_id!r}.")
        with self._connect() as con:
            rows = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM seeds WHERE id = ?", (seed_id,)).fetchall()
            if not rows:
                like = seed_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
                rows = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM seeds WHERE id LIKE ? ESCAPE '\\'",
                                   (like,)).fetchall()
            ids = [r[0] for r in con.execute("SELECT id FROM seeds").fetchall()] if len(rows) != 1 else []
        if len(rows) == 1:
            return _record(rows[0])
        if rows:
            raise SeedNotFoundError(f"seed id prefix {seed_id!r} matches {len(rows)} entries in {self.path}: "
                                    f"{sorted(r[0] for r in rows)}; give more digits.")
        close = difflib.get_close_matches(seed_id, ids, n=3, cutoff=0.5)
        raise SeedNotFoundError(f"no seed {seed_id!r} in library {self.path} ({len(ids)} entries; close ids: "
                                f"{close or 'none'}). List them with `esper-fn library list {self.path}`.")

    def load(self, seed_id: str) -> SeedArtifact:
        """The stored seed, verified: the artifact's size and SHA-256 match the record, and so do
        its tensors' names, dtypes and shapes.

        Raises:
            SeedNotFoundError: no such entry.
            LibraryError: the artifact is missing, truncated or corrupt (naming the entry and file).
        """
        import safetensors
        import safetensors.torch

        rec = self.get(seed_id)
        data = self._verified_bytes(rec)
        try:
            flat = safetensors.torch.load(data)
        except safetensors.SafetensorError as e:  # only reachable if the bytes and the record were both forged
            raise LibraryError(f"seed {rec.id}: {self.artifact_path(rec.sha256)} is not a valid safetensors file "
                               f"({e}).") from None
        # In the order they were stored (the blueprint's); safetensors sorts its keys.
        params = {k.split("/", 1)[1]: flat[k] for k in rec.tensors if k.startswith("params/")}
        buffers = {k.split("/", 1)[1]: flat[k] for k in rec.tensors if k.startswith("buffers/")}
        return SeedArtifact(rec, params, buffers)

    def _verified_bytes(self, rec: SeedRecord) -> bytes:
        path = self.artifact_path(rec.sha256)
        problem = _check_artifact(path, rec)
        if problem is not None:
            raise LibraryError(f"seed {rec.id} ({rec.blueprint} from run {rec.run_id}): {problem}. Run "
                               f"`esper-fn library verify {self.path}` to check every entry; "
                               f"`esper-fn library gc {self.path} --drop-bad` removes bad entries.")
        return path.read_bytes()

    def candidates(self, state: State, slot: str, *, blueprint: str | None = None) -> list[SeedRecord]:
        """Stored seeds that can warm-start `slot` of `state` (`fit` would accept them): same
        blueprint as it resolves on this machine, and tensors of the shapes the blueprint creates
        at this slot. Best measured contribution first (unmeasured last).

        Args:
            state: a single state.
            slot: the slot to fill.
            blueprint: only this blueprint (id or bare name).
        """
        from . import _blueprint as bpm

        spec = state.spec(slot)
        out = []
        for rec in self.records(blueprint=blueprint):
            try:
                bp = bpm.get(rec.blueprint)
            except (BlueprintError, CapabilityError):  # unknown here, or unavailable: not a candidate
                continue
            if bp.id == rec.blueprint and bp.fits(spec) and _fit_problems(rec.tensors, _expected(bp, spec)) == []:
                out.append(rec)
        return sorted(out, key=lambda r: (r.contribution is None, -(r.contribution or 0.0), r.created))

    # -- maintenance -----------------------------------------------------------------------------
    def verify(self) -> list[Problem]:
        """Check every entry's artifact (exists, size, SHA-256, safetensors header, tensor names,
        dtypes and shapes) and list what is wrong: one `Problem` per bad entry, plus artifact files
        that no entry references and leftover temporary files. An empty list means all is well."""
        problems = []
        for rec in self.records():
            why = _check_artifact(self.artifact_path(rec.sha256), rec)
            if why is not None:
                problems.append(Problem(id=rec.id, path=str(self.artifact_path(rec.sha256)), reason=why))
        orphans, leftovers = self._strays()
        problems += [Problem(id=None, path=str(p), reason="artifact file referenced by no entry (remove it with "
                             "`gc`)") for p in orphans]
        problems += [Problem(id=None, path=str(p), reason="temporary file of an unfinished write (remove it with "
                             "`gc`)") for p in leftovers]
        return problems

    def _strays(self, con: sqlite3.Connection | None = None) -> tuple[list[Path], list[Path]]:
        if con is None:
            with self._connect() as c:
                used = {r[0] for r in c.execute("SELECT DISTINCT sha256 FROM seeds")}
        else:
            used = {r[0] for r in con.execute("SELECT DISTINCT sha256 FROM seeds")}
        orphans, leftovers = [], []
        if self.artifacts_dir.exists():
            for p in sorted(self.artifacts_dir.iterdir()):
                if p.name.startswith(TMP_PREFIX):
                    leftovers.append(p)
                elif p.suffix == ".safetensors" and p.stem not in used:
                    orphans.append(p)
        return orphans, leftovers

    def gc(self, *, drop_bad: bool = False, dry_run: bool = False) -> GCReport:
        """Remove artifact files no entry references and temporary files of unfinished writes;
        with `drop_bad`, also remove entries whose artifact is missing or corrupt (and then their
        now unreferenced files). Holds the write lock throughout, so it never races a `put`.

        Args:
            drop_bad: also drop bad entries (what `verify` reports against an id).
            dry_run: report what would be removed and remove nothing.
        """
        with self._write() as con:
            dropped = []
            if drop_bad:
                rows = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM seeds ORDER BY created, id").fetchall()
                for rec in map(_record, rows):
                    if _check_artifact(self.artifact_path(rec.sha256), rec) is not None:
                        dropped.append(rec.id)
                if not dry_run:
                    con.executemany("DELETE FROM seeds WHERE id = ?", [(i,) for i in dropped])
            orphans, leftovers = self._strays(con)
            if dry_run and dropped:  # files only the dropped entries referenced would be orphans too
                keep = {r[0] for r in con.execute(
                    f"SELECT sha256 FROM seeds WHERE id NOT IN ({', '.join('?' * len(dropped))})", dropped)}
                orphans += [self.artifact_path(s) for s in
                            {r[0] for r in con.execute("SELECT sha256 FROM seeds")} - keep
                            if self.artifact_path(s).exists()]
            freed = 0
            for p in orphans + leftovers:
                try:
                    freed += p.stat().st_size
                    if not dry_run:
                        p.unlink()
                except FileNotFoundError:
                    pass
        return GCReport(orphans=[p.name for p in orphans], leftovers=[p.name for p in leftovers], dropped=dropped,
                        freed_bytes=freed, dry_run=dry_run)

    def remove(self, seed_id: str) -> SeedRecord:
        """Remove one entry (its artifact file goes too unless another entry shares it).

        Raises:
            SeedNotFoundError: no such entry.
        """
        rec = self.get(seed_id)
        with self._write() as con:
            con.execute("DELETE FROM seeds WHERE id = ?", (rec.id,))
            shared = con.execute("SELECT COUNT(*) FROM seeds WHERE sha256 = ?", (rec.sha256,)).fetchone()[0]
            if not shared:
                self.artifact_path(rec.sha256).unlink(missing_ok=True)
        return rec


# --------------------------------------------------------------------------------- warm start


def resolve(from_library: str | SeedArtifact, library: Library | str | os.PathLike | None) -> SeedArtifact:
    """The verified artifact `warm_start(state, slot, from_library, library=...)` asked for.

    Args:
        from_library: a `SeedArtifact` (already loaded), or the id of an entry in `library`.
        library: a `Library` or a library directory (needed with an id).

    Raises:
        WarmStartError: an id without a library, or a value of the wrong type.
        SeedNotFoundError, LibraryError: as `Library.load`.
    """
    if isinstance(from_library, SeedArtifact):
        return from_library
    if not isinstance(from_library, str):
        raise WarmStartError(f"from_library must be a stored seed's id or an `esper_fn.urza.SeedArtifact`, got "
                             f"{type(from_library).__name__}.")
    if library is None:
        raise WarmStartError(f"from_library={from_library!r} names a stored seed; say which library holds it with "
                             "library=PATH (or a `esper_fn.urza.Library`).")
    lib = library if isinstance(library, Library) else Library(library, create=False)
    return lib.load(from_library)


def warm_start(state: State, slot: str, from_library: str | SeedArtifact, *, library: Library | str | os.PathLike | None = None,
               blueprint: str | Blueprint | None = None, **germinate_kwargs) -> State:
    """Germinate a stored seed at `slot`: its trained weights instead of a fresh draw.

    The seed enters at alpha 0 like any other (the function is unchanged now); its weights matter
    once it blends in. The lifecycle is checked before any file is read.

    Args:
        state: the state (stacked states get the stored weights on every host).
        slot: a DORMANT slot.
        from_library: a stored seed's id (a unique prefix) in `library`, or a loaded `SeedArtifact`.
        library: a `Library` or its directory (needed with an id).
        blueprint: the design to graft (default: the stored seed's); it must be the stored seed's.
        germinate_kwargs: `esper_fn.germinate`'s other options (tempo, curve).

    Returns:
        The new state.

    Raises:
        IllegalTransitionError: the slot is not DORMANT.
        WarmStartError: an id without a library; the stored seed is another blueprint, or its tensors
            do not fit the slot (`fit`).
        SeedNotFoundError, LibraryError: as `Library.load`.
    """
    from . import _blueprint as bpm
    from ._lifecycle import Op, check_transition
    from ._state import germinate

    check_transition(slot, state.stage(slot), Op.GERMINATE)
    artifact = resolve(from_library, library)
    bp = bpm.get(blueprint if blueprint is not None else artifact.record.blueprint)
    weights = fit(artifact, bp, state.spec(slot))
    return germinate(state, slot, bp, weights=weights, **germinate_kwargs)


def fit(artifact: SeedArtifact, bp: Blueprint, spec: SlotSpec) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The artifact's tensors as a fresh seed at `spec`, or a `WarmStartError` saying why not.

    A stored seed fits a slot when the blueprint that runs there is the one it was trained as (same
    id: a capability fallback is another design) and every tensor it holds has the name, dtype and
    shape the blueprint creates at this slot. The slot may differ from the one it was trained at (a
    conv seed from the "input" slot of mlp-impaired fits the "input" slot of cnn-impaired: both are
    [40] vectors); width-dependent designs fit only slots of the same width.

    Returns:
        ``(params, buffers)``: copies of the stored tensors, in the blueprint's order.

    Raises:
        WarmStartError: the blueprint differs, or a tensor is missing, extra or of another
            dtype or shape (all listed).
    """
    rec = artifact.record
    if rec.blueprint != bp.id:
        raise WarmStartError(
            f"stored seed {rec.id} is a {rec.blueprint!r} seed, and slot {spec.name!r} would run {bp.id!r}; a warm "
            f"start needs the same design. Germinate {rec.blueprint!r} (or leave blueprint unset), or pick a stored "
            f"seed of {bp.id!r} with `Library.candidates(state, {spec.name!r})`.")
    expected = _expected(bp, spec)
    actual = {f"params/{k}": v for k, v in artifact.params.items()}
    actual.update({f"buffers/{k}": v for k, v in artifact.buffers.items()})
    problems = _fit_problems({k: TensorInfo(dtype=_st_dtype(v.dtype), shape=list(v.shape)) for k, v in actual.items()},
                             expected)
    if problems:
        raise WarmStartError(
            f"stored seed {rec.id} ({rec.blueprint}, trained at slot {rec.slot!r} of {rec.host}, slot shape "
            f"{tuple(rec.slot_shape)}) does not fit slot {spec.name!r} (shape {tuple(spec.shape)}): "
            + "; ".join(problems) + ". Find stored seeds that fit with `Library.candidates(state, slot)`.")
    params = {k: artifact.params[k].clone() for k in (n.split("/", 1)[1] for n in expected if n.startswith("params/"))}
    buffers = {k: artifact.buffers[k].clone()
               for k in (n.split("/", 1)[1] for n in expected if n.startswith("buffers/"))}
    return params, buffers


def _expected(bp: Blueprint, spec: SlotSpec) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes of the tensors `bp` creates at `spec` (drawn with a private
    generator, so no caller's random stream moves)."""
    import torch

    p, b = bp.init(spec, torch.Generator().manual_seed(0))
    out = {f"params/{k}": TensorInfo(dtype=_st_dtype(v.dtype), shape=list(v.shape)) for k, v in p.items()}
    out.update({f"buffers/{k}": TensorInfo(dtype=_st_dtype(v.dtype), shape=list(v.shape)) for k, v in b.items()})
    return out


def _fit_problems(actual: Mapping[str, TensorInfo], expected: Mapping[str, TensorInfo]) -> list[str]:
    problems = []
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing}")
    if extra:
        problems.append(f"unexpected tensors {extra}")
    for k in expected:
        if k in actual and (actual[k].dtype, actual[k].shape) != (expected[k].dtype, expected[k].shape):
            problems.append(f"{k} is {actual[k].dtype} {actual[k].shape}, the slot needs "
                            f"{expected[k].dtype} {expected[k].shape}")
    return problems


# --------------------------------------------------------------------------------- helpers


def _st_dtype(dtype: torch.dtype) -> str:
    """The safetensors dtype code of a torch dtype ("F32" for torch.float32)."""
    import torch

    codes = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    return codes.get(dtype, str(dtype))


def _spec_json(spec: SlotSpec) -> dict[str, Any]:
    import dataclasses

    out = {}
    for f in dataclasses.fields(spec):
        v = getattr(spec, f.name)
        if isinstance(v, tuple):
            v = list(v)
        elif f.name == "dtype":
            v = str(v).removeprefix("torch.")
        out[f.name] = v
    return out


def _record(row: tuple) -> SeedRecord:
    d = dict(zip(_COLUMNS, row))
    for c in _JSON_COLUMNS:
        d[c] = json.loads(d[c])
    return SeedRecord.model_validate(d)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse_header(data: bytes, where: str) -> dict[str, tuple[str, list[int]]]:
    """``{name: (dtype code, shape)}`` from a safetensors file's header, checking that every
    tensor's byte range is consistent with its dtype and shape and lies inside the file.

    Raises:
        LibraryError: the bytes are not a well-formed safetensors file.
    """
    if len(data) < 8:
        raise LibraryError(f"{where} is not a safetensors file: {len(data)} bytes, shorter than its 8-byte header size.")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise LibraryError(f"{where} is not a safetensors file: its header claims {n} bytes, the file has {len(data)}.")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LibraryError(f"{where} has an unreadable safetensors header ({e}).") from None
    if not isinstance(header, dict):
        raise LibraryError(f"{where} has a safetensors header that is not a JSON object.")
    out = {}
    body = len(data) - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise LibraryError(f"{where}: malformed header entry for tensor {name!r}.") from None
        numel = 1
        for s in shape:
            numel *= int(s)
        size = numel * _ITEMSIZE.get(dtype, 0)
        if dtype not in _ITEMSIZE or not 0 <= start <= stop <= body or stop - start != size:
            raise LibraryError(f"{where}: tensor {name!r} ({dtype} {shape}) has byte range [{start}, {stop}) that does "
                               f"not match its dtype and shape or the file's {body} data bytes.")
        out[name] = (dtype, shape)
    return out


def _check_artifact(path: Path, rec: SeedRecord) -> str | None:
    """What is wrong with the artifact of `rec` at `path`, or None. Reads the file once."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return f"artifact {path} is missing"
    except OSError as e:
        return f"artifact {path} cannot be read ({e})"
    if len(data) != rec.size:
        return f"artifact {path} has {len(data)} bytes, the index recorded {rec.size} (truncated or altered)"
    digest = hashlib.sha256(data).hexdigest()
    if digest != rec.sha256:
        return f"artifact {path} is corrupt: SHA-256 {digest}, the index recorded {rec.sha256}"
    try:
        header = _parse_header(data, str(path))
    except LibraryError as e:
        return str(e)
    stated = {k: TensorInfo(dtype=d, shape=s) for k, (d, s) in header.items()}
    problems = _fit_problems(stated, rec.tensors)
    if problems:
        return f"artifact {path} holds other tensors than the index recorded: " + "; ".join(problems)
    return None
