"""Tests for esper_fn.events: typed JSON-lines events, round trips and corruption handling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from esper_fn._errors import EsperError
from esper_fn.events import (
    Advanced,
    CheckpointSaved,
    EpochMetrics,
    Event,
    EventLog,
    EventLogError,
    Fossilized,
    Germinated,
    GrowthBlocked,
    Pruned,
    Rollback,
    StuckAtChance,
    read_events,
)

ONE_OF_EACH: list[Event] = [
    Germinated(run_id="r", epoch=0, slot="l1", blueprint="conv_small", seed_id=3),
    Advanced(run_id="r", epoch=1, slot="l1", from_stage="GERMINATED", to_stage="TRAINING"),
    Fossilized(run_id="r", epoch=5, slot="l1", merged=True),
    Pruned(run_id="r", epoch=6, slot="l2", reason="gate 'improvement' failed: -0.01 < 0.0"),
    Rollback(run_id="r", epoch=7, reason="val loss spiked", to_epoch=4, pruned=["l2", "l3"]),
    StuckAtChance(run_id="r", epoch=5, chance=0.1, threshold=0.16, best_val_accuracy=0.11),
    GrowthBlocked(run_id="r", epoch=9, reason="budget 1100 leaves 97 parameters", budget=1100, params=1003),
    EpochMetrics(run_id="r", epoch=7, metrics={"train_loss": 0.25, "val_acc": 0.875}),
    CheckpointSaved(run_id="r", epoch=7, step=280, path="runs/r/ckpt/step_00000280"),
]


def _write(path: Path, events: list[Event]) -> None:
    with EventLog(path) as log:
        for e in events:
            log.append(e)


def test_round_trip_of_every_event_type(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "events.jsonl"  # parent dirs are created
    _write(path, ONE_OF_EACH)
    back = read_events(path)
    assert back == ONE_OF_EACH
    assert [type(e) for e in back] == [type(e) for e in ONE_OF_EACH]
    assert len(path.read_text().splitlines()) == len(ONE_OF_EACH)
    kinds = [json.loads(line)["kind"] for line in path.read_text().splitlines()]
    assert kinds == [
        "germinated", "advanced", "fossilized", "pruned", "rollback", "stuck_at_chance", "growth_blocked",
        "epoch_metrics", "checkpoint_saved"
    ]  # fmt: skip


def test_defaults(tmp_path: Path) -> None:
    e = Fossilized(run_id="r", epoch=2, merged=False)
    assert e.kind == "fossilized" and e.slot is None
    assert abs(e.time - __import__("time").time()) < 60


def test_non_finite_metrics_survive(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    e = EpochMetrics(run_id="r", epoch=0, metrics={"loss": math.nan, "grad": math.inf, "low": -math.inf})
    _write(path, [e])
    (back,) = read_events(path)
    assert isinstance(back, EpochMetrics)
    assert math.isnan(back.metrics["loss"])
    assert back.metrics["grad"] == math.inf and back.metrics["low"] == -math.inf


def test_strings_with_newlines_stay_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    e = Pruned(run_id="r", epoch=0, reason="line one\nline two \u00e9")
    _write(path, [e])
    assert path.read_bytes().count(b"\n") == 1
    assert read_events(path) == [e]


def test_events_are_frozen_and_forbid_extra_keys() -> None:
    e = Pruned(run_id="r", epoch=0, reason="x")
    with pytest.raises(ValidationError):
        e.reason = "y"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="extra"):
        Pruned(run_id="r", epoch=0, reason="x", reasn="typo")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        Germinated(run_id="r", epoch=-1, blueprint="b", seed_id=0)


def test_extra_key_in_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    _write(path, ONE_OF_EACH[:2])
    record = json.loads(ONE_OF_EACH[2].model_dump_json())
    record["surprise"] = 1
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    with pytest.raises(EventLogError, match=r"events\.jsonl:3: not a valid event .*surprise.*Extra inputs"):
        read_events(path)


def test_wrong_kind_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    record = json.loads(ONE_OF_EACH[0].model_dump_json())
    record["kind"] = "sprouted"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(EventLogError, match=r"events\.jsonl:1: .*sprouted"):
        read_events(path)
    # a valid kind with the fields of another kind is rejected too
    record = json.loads(ONE_OF_EACH[0].model_dump_json())
    record["kind"] = "pruned"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(EventLogError, match=r"events\.jsonl:1: .*pruned"):
        read_events(path)


def test_malformed_line_names_its_number(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    _write(path, ONE_OF_EACH[:3])
    lines = path.read_text().splitlines()
    lines.insert(2, '{"kind": "pruned", "run_id": ')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(EventLogError, match=r"events\.jsonl:3: not a valid event .*Invalid JSON"):
        read_events(path)
    # a malformed line in the middle is never skipped, even with skip_truncated_tail
    with pytest.raises(EventLogError, match=r":3: "):
        read_events(path, skip_truncated_tail=True)


def test_empty_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    _write(path, ONE_OF_EACH[:2])
    with path.open("a") as f:
        f.write("\n")
    with pytest.raises(EventLogError, match=r":3: empty line"):
        read_events(path)


def test_truncated_tail(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    _write(path, ONE_OF_EACH[:4])
    whole = ONE_OF_EACH[4].model_dump_json()
    with path.open("a") as f:
        f.write(whole[: len(whole) // 2])  # crash mid-write: no newline
    with pytest.raises(EventLogError, match=r"events\.jsonl:5: the last line is not newline-terminated"):
        read_events(path)
    assert read_events(path, skip_truncated_tail=True) == ONE_OF_EACH[:4]


def test_unterminated_but_complete_last_line_still_counts_as_truncated(tmp_path: Path) -> None:
    # the writer emits line + newline in one write; a missing newline means that write was cut
    path = tmp_path / "events.jsonl"
    path.write_text(ONE_OF_EACH[0].model_dump_json())
    with pytest.raises(EventLogError, match=r":1: the last line is not newline-terminated"):
        read_events(path)
    assert read_events(path, skip_truncated_tail=True) == []


def test_appending_after_a_truncated_tail(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    _write(path, ONE_OF_EACH[:2])
    with path.open("a") as f:
        f.write('{"kind": "fossil')
    before = path.read_bytes()
    with pytest.raises(EventLogError, match=r":3: .*drop_truncated_tail=True"):
        EventLog(path)
    assert path.read_bytes() == before  # refusing to open changes nothing
    with EventLog(path, drop_truncated_tail=True) as log:
        log.append(ONE_OF_EACH[2])
    assert read_events(path) == ONE_OF_EACH[:3]


def test_two_logs_in_sequence_keep_order(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    _write(path, ONE_OF_EACH[:3])
    log = EventLog(path, fsync=True)
    for e in ONE_OF_EACH[3:]:
        log.append(e)
    log.close()
    assert read_events(path) == ONE_OF_EACH


def test_append_is_visible_before_close(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path) as log:
        log.append(ONE_OF_EACH[0])
        assert read_events(path) == ONE_OF_EACH[:1]  # flushed, not buffered


def test_closed_log_and_bad_events(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    with pytest.raises(EventLogError, match="expected one of"):
        log.append(Event(kind="germinated", run_id="r", epoch=0))
    with pytest.raises(EventLogError, match="dict"):
        log.append({"kind": "pruned"})  # type: ignore[arg-type]
    log.close()
    log.close()
    assert log.closed
    with pytest.raises(EventLogError, match="closed"):
        log.append(ONE_OF_EACH[0])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EventLogError, match="does not exist"):
        read_events(tmp_path / "nope.jsonl")


def test_error_hierarchy() -> None:
    assert issubclass(EventLogError, EsperError)
    assert issubclass(EventLogError, OSError)
    # one error hierarchy: the class lives in esper_fn._errors and esper_fn.events re-exports it
    import esper_fn._errors as errors

    assert EventLogError is errors.EventLogError and "EventLogError" in errors.__all__


def test_empty_log_reads_as_no_events(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    EventLog(path).close()
    assert path.exists()
    assert read_events(path) == []
