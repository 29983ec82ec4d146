"""Typed events appended to an `events.jsonl` file: the record of what happened during a run.

Every lifecycle change (a seed germinated, advanced, fossilized or pruned, a rollback), every
governor finding (a run stuck at chance, a growth the parameter budget blocked) and every epoch's
metrics is one pydantic model, written as one JSON line by `EventLog.append` and read back,
typed, by `read_events`. The `kind` field is the discriminator, so a line parses straight into the
right class.

The models are contracts: ``extra="forbid"`` makes a misspelled key an error, and they are frozen.
Non-finite floats (a diverged loss) are written as the JSON extensions ``NaN`` / ``Infinity`` so
they survive the round trip instead of turning into ``null``.

A writer that dies mid-write leaves an unterminated last line. `read_events` reports it (with
its line number) unless asked to skip it, and `EventLog` refuses to append after it unless asked to
cut it off, so a partial record never merges with the next one.
"""

from __future__ import annotations

import os
import time as _time
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ._errors import EventLogError

__all__ = [
    "Advanced",
    "AnyEvent",
    "CheckpointSaved",
    "EpochMetrics",
    "Event",
    "EventLog",
    "EventLogError",
    "Fossilized",
    "Germinated",
    "GrowthBlocked",
    "Pruned",
    "Resumed",
    "Rollback",
    "Sculpted",
    "StuckAtChance",
    "read_events",
]


class Event(BaseModel):
    """Fields common to every event. Not written on its own: use a subclass.

    Attributes:
        kind: the discriminator, fixed per subclass (e.g. "germinated").
        run_id: the run this event belongs to.
        epoch: the epoch at which it happened, >= 0.
        slot: the seed slot it concerns, or None for run-level events.
        time: unix time in seconds; defaults to the moment the event is built.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    kind: str
    run_id: str
    epoch: int = Field(ge=0)
    slot: str | None = None
    time: float = Field(default_factory=_time.time)


class Germinated(Event):
    """A seed was created in a slot from a blueprint."""

    kind: Literal["germinated"] = "germinated"
    blueprint: str
    seed_id: int = Field(ge=0)


class Advanced(Event):
    """A seed moved from one lifecycle stage to the next."""

    kind: Literal["advanced"] = "advanced"
    from_stage: str
    to_stage: str


class Fossilized(Event):
    """A seed became permanent; `merged` says whether it was folded into the host's weights, and
    `contribution` is its measured contribution when the decision was taken (validation accuracy
    with it minus without it; None where it was not measured)."""

    kind: Literal["fossilized"] = "fossilized"
    merged: bool
    contribution: float | None = None


class Pruned(Event):
    """A seed was removed; `reason` says why (e.g. the gate that failed)."""

    kind: Literal["pruned"] = "pruned"
    reason: str


class Rollback(Event):
    """The run went back to the state of `to_epoch`; `pruned` names the slots whose seeds were removed."""

    kind: Literal["rollback"] = "rollback"
    reason: str
    to_epoch: int = Field(ge=0)
    pruned: list[str]


class Sculpted(Event):
    """Hidden units were removed (`esper_fn.sculpt`): at `slot` (None: several targets at once).

    Attributes:
        keep: as asked (a float: the fraction of the network's parameters to keep; an int: units to
            keep per unit group).
        by: the criterion ("contribution" or "magnitude").
        params_before, params_after: the network's parameters.
        units: per target slot, its units per unit group after the sculpt.
        units_removed: units removed over every target.
        val_accuracy_before, val_accuracy_after: on the batch the sculpt measured (the validation
            split), without fine-tuning; None without labels.
        max_abs_dlogits: the largest output change on that batch.
    """

    kind: Literal["sculpted"] = "sculpted"
    keep: int | float
    by: str
    params_before: int = Field(ge=0)
    params_after: int = Field(ge=0)
    units: dict[str, list[int]]
    units_removed: int = Field(ge=0)
    val_accuracy_before: float | None = None
    val_accuracy_after: float | None = None
    max_abs_dlogits: float | None = None


class StuckAtChance(Event):
    """The governor found that the run has not left chance (see `esper_fn.run.GovernorConfig`).

    Written once per run, at the first epoch >= ``GovernorConfig.stuck_epochs`` at which no epoch's
    validation accuracy has exceeded ``chance + 3 x chance_margin``. Such a run learned nothing;
    its accuracy must not be compared as if it had trained.

    Attributes:
        chance: 1 / n_classes.
        threshold: the validation accuracy the run never exceeded (chance + 3 x chance_margin).
        best_val_accuracy: the best validation accuracy so far.
    """

    kind: Literal["stuck_at_chance"] = "stuck_at_chance"
    chance: float
    threshold: float
    best_val_accuracy: float


class GrowthBlocked(Event):
    """The controller wanted to germinate, and the parameter budget left no seed that fits.

    Written once per run, the first time it happens; `reason` names the budget and the smallest
    candidate seed that did not fit.
    """

    kind: Literal["growth_blocked"] = "growth_blocked"
    reason: str
    budget: int = Field(ge=0)
    params: int = Field(ge=0)


class EpochMetrics(Event):
    """Scalar metrics of one epoch, e.g. {"train_loss": 0.31, "val_acc": 0.88}; NaN and inf allowed."""

    kind: Literal["epoch_metrics"] = "epoch_metrics"
    metrics: dict[str, float]


class Resumed(Event):
    """The run was resumed in its directory: from checkpoint `from_step` (0: from the start, when the
    run stopped before its first checkpoint); `skipped` lists checkpoints that could not be used
    (newest first) and `reason` says why, in words."""

    kind: Literal["resumed"] = "resumed"
    from_step: int = Field(ge=0)
    skipped: list[int] = Field(default_factory=list)
    reason: str


class CheckpointSaved(Event):
    """A checkpoint of training step `step` was written to `path`."""

    kind: Literal["checkpoint_saved"] = "checkpoint_saved"
    step: int = Field(ge=0)
    path: str


EVENT_TYPES: tuple[type[Event], ...] = (
    Germinated,
    Advanced,
    Fossilized,
    Pruned,
    Rollback,
    StuckAtChance,
    GrowthBlocked,
    EpochMetrics,
    CheckpointSaved,
    Resumed,
    Sculpted,
)

AnyEvent = Annotated[
    Germinated | Advanced | Fossilized | Pruned | Rollback | StuckAtChance | GrowthBlocked | EpochMetrics
    | CheckpointSaved | Resumed | Sculpted,
    Field(discriminator="kind"),
]

_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyEvent)
_SNIPPET = 80


class EventLog:
    """An append-only JSON-lines file of events.

    Opening creates the parent directories and the file if needed; existing events are kept. Each
    `append` writes one line in a single write and flushes it, so another reader (or a crash) sees
    whole lines only, except for the rare crash inside that write. Use as a context manager, or call
    `close`.

    Args:
        path: the file, conventionally ``<run dir>/events.jsonl``.
        fsync: also `os.fsync` after every append (survives power loss; costs about a millisecond
            per event on most disks).
        drop_truncated_tail: if the file ends in an unterminated line (a writer crashed mid-write),
            cut that partial line off before appending. Without it, such a file is refused.

    Raises:
        EventLogError: if the file ends in an unterminated line and `drop_truncated_tail` is False.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False, drop_truncated_tail: bool = False):
        self.path = Path(path)
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")  # noqa: SIM115 - closed by close() / __exit__
        try:
            self._check_tail(drop_truncated_tail)
        except BaseException:
            self._file.close()
            raise

    def _check_tail(self, drop: bool) -> None:
        size = self._file.seek(0, os.SEEK_END)
        if size == 0:
            return
        self._file.seek(size - 1)
        if self._file.read(1) == b"\n":
            return
        # Find the start of the unterminated last line.
        self._file.seek(0)
        data = self._file.read()
        cut = data.rfind(b"\n") + 1
        line_no = data.count(b"\n") + 1
        if not drop:
            raise EventLogError(
                f"{self.path}:{line_no}: the last line is not newline-terminated (a writer probably "
                f"crashed mid-write): {data[cut:cut + _SNIPPET]!r}. Appending would merge it with the "
                f"next event. Open with EventLog(path, drop_truncated_tail=True) to cut it off."
            )
        self._file.truncate(cut)
        self._file.flush()
        os.fsync(self._file.fileno())

    @property
    def closed(self) -> bool:
        """Whether the log has been closed."""
        return self._file.closed

    def append(self, event: Event) -> None:
        """Write `event` as one JSON line and flush it (and fsync it if the log was opened with fsync).

        Args:
            event: an instance of one of the event classes (`Germinated`, ..., `CheckpointSaved`).

        Raises:
            EventLogError: if the log is closed, or `event` is not one of the event classes (a bare
                `Event` has no fixed kind and could not be read back).
        """
        if self._file.closed:
            raise EventLogError(f"cannot append to {self.path}: the EventLog is closed. Open a new EventLog.")
        if type(event) not in EVENT_TYPES:
            raise EventLogError(
                f"cannot append a {type(event).__name__} to {self.path}: expected one of "
                f"{[t.__name__ for t in EVENT_TYPES]}."
            )
        line = event.model_dump_json().encode("utf-8") + b"\n"
        self._file.write(line)
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file. Closing twice is harmless."""
        self._file.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EventLog({str(self.path)!r}, fsync={self.fsync}, closed={self.closed})"


def read_events(path: str | os.PathLike[str], *, skip_truncated_tail: bool = False) -> list[AnyEvent]:
    """Read every event of a JSON-lines log back into typed objects, in file order.

    Args:
        path: a file written by `EventLog`.
        skip_truncated_tail: ignore an unterminated last line (what a crash mid-write leaves).
            Only that line is tolerated: a malformed line anywhere else still raises.

    Returns:
        The events, each an instance of its own class (`Germinated`, `EpochMetrics`, ...).

    Raises:
        EventLogError: if the file is missing; if a line is empty, not valid JSON, or not a valid
            event (the message gives ``file:line`` and the reason); or if the last line is
            unterminated and `skip_truncated_tail` is False.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise EventLogError(f"no event log at {path}: the file does not exist.") from None
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail:
        if not skip_truncated_tail:
            raise EventLogError(
                f"{path}:{len(lines) + 1}: the last line is not newline-terminated (a writer probably "
                f"crashed mid-write): {tail[:_SNIPPET]!r}. Pass skip_truncated_tail=True to ignore it."
            )
    events: list[AnyEvent] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            raise EventLogError(f"{path}:{i}: empty line; every line of an event log must hold one event.")
        try:
            events.append(_ADAPTER.validate_json(line))
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '<line>'}: {e['msg']}" for e in err.errors()
            )
            raise EventLogError(f"{path}:{i}: not a valid event ({problems}): {line[:_SNIPPET]!r}") from None
    return events
