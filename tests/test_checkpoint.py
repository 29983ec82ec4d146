"""Tests for esper_fn.checkpoint: bit-exact round trips, retention, atomicity, corruption detection."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esper_fn._errors import CheckpointError, EsperError
from esper_fn.checkpoint import MANIFEST_FILE, TENSORS_FILE, CheckpointManager, Manifest


def _state(scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "params/host/fc1/weight": torch.randn(4, 3, generator=g) * scale,
        "params/host/fc1/bias": torch.randn(4, generator=g) * scale,
        "opt/step": torch.tensor(12, dtype=torch.int64),
        "alpha": torch.tensor(0.25),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 5, dtype=torch.float64),
    }


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _assert_bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert _bits(a[k]) == _bits(b[k]), k


def _step_dirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_save_restore_identity(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "ckpt")
    state = _state()
    before = {k: v.clone() for k, v in state.items()}
    meta = {"epoch": 3, "stage": {"l1": "BLENDING"}, "history": [0.5, 0.25], "note": None, "ok": True}
    path = mgr.save(7, state, meta)
    assert path == tmp_path / "ckpt" / "step_00000007"
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST_FILE, TENSORS_FILE]
    _assert_bit_exact(state, before)  # inputs untouched
    tensors, metadata = mgr.restore(7)
    _assert_bit_exact(tensors, state)
    assert metadata == meta
    # restored tensors own their memory: writing to them changes neither the file nor a second restore
    tensors["alpha"].fill_(9.0)
    again, _ = mgr.restore()
    assert float(again["alpha"]) == 0.25


def test_non_finite_metadata_round_trips(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {}, {"best": math.inf, "hist": [1.5, math.nan, -math.inf]})
    _, meta = mgr.restore(1)
    assert meta["best"] == math.inf
    assert meta["hist"][0] == 1.5 and math.isnan(meta["hist"][1]) and meta["hist"][2] == -math.inf


def test_manifest_contents(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _state(), {"a": 1})
    manifest = Manifest.model_validate_json((mgr.step_dir(1) / MANIFEST_FILE).read_text())
    assert manifest.schema_version == 1 and manifest.step == 1
    assert set(manifest.files) == {TENSORS_FILE}
    assert manifest.files[TENSORS_FILE].size == (mgr.step_dir(1) / TENSORS_FILE).stat().st_size
    assert manifest.tensors["opt/step"].dtype == "int64" and manifest.tensors["opt/step"].shape == []
    assert manifest.tensors["params/host/fc1/weight"].shape == [4, 3]
    assert manifest.metadata == {"a": 1}


def test_non_contiguous_and_shared_tensors_are_saved(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    base = torch.arange(12.0).reshape(3, 4)
    state = {"base": base, "transposed": base.t(), "row": base[1], "tied": base}
    mgr.save(0, state, {})
    tensors, _ = mgr.restore(0)
    for k, v in state.items():
        assert torch.equal(tensors[k], v)
    assert tensors["base"].data_ptr() != tensors["tied"].data_ptr()


def test_grad_tensors_are_detached(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    w = torch.nn.Parameter(torch.ones(2))
    mgr.save(0, {"w": w}, {})
    tensors, _ = mgr.restore(0)
    assert not tensors["w"].requires_grad and torch.equal(tensors["w"], torch.ones(2))


_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8, torch.uint8
]  # fmt: skip
_KEYS = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda k: k != "__metadata__"
)


@st.composite
def _tensor(draw: st.DrawFn) -> torch.Tensor:
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    if draw(st.integers(0, len(_DTYPES))) == len(_DTYPES):
        return torch.randint(0, 2, shape, generator=g, dtype=torch.bool)
    dtype = draw(st.sampled_from(_DTYPES))
    # random bit patterns: covers NaN payloads, infinities, subnormals and negative zero
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


@settings(max_examples=40, deadline=None, database=None)
@given(
    tensors=st.dictionaries(_KEYS, _tensor(), max_size=6),
    meta=st.dictionaries(
        st.text(max_size=8),
        st.none() | st.booleans() | st.integers(-(2**62), 2**62) | st.floats()
        | st.text(max_size=8),
        max_size=4,
    ),
)
def test_round_trip_property(tensors: dict[str, torch.Tensor], meta: dict[str, object]) -> None:
    with tempfile.TemporaryDirectory() as d:
        mgr = CheckpointManager(d)
        mgr.save(0, tensors, meta)
        back, back_meta = mgr.restore(0)
    _assert_bit_exact(back, tensors)
    assert json.dumps(back_meta) == json.dumps(meta)  # NaN-aware comparison


def test_steps_and_latest(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, max_to_keep=None)
    assert mgr.steps() == [] and mgr.latest_step() is None
    for s in (5, 1, 100):
        mgr.save(s, _state(), {"s": s})
    assert mgr.steps() == [1, 5, 100]
    assert mgr.latest_step() == 100
    assert mgr.restore()[1] == {"s": 100}
    # a step_ directory without a manifest (not written by save) is not a checkpoint
    (tmp_path / "step_00000200").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    assert mgr.steps() == [1, 5, 100]


def test_retention_max_to_keep(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, max_to_keep=2)
    for s in range(0, 50, 10):
        mgr.save(s, _state(), {})
    assert mgr.steps() == [30, 40]
    assert _step_dirs(tmp_path) == ["step_00000030", "step_00000040"]  # nothing else left behind


def test_retention_keep_every_n(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, max_to_keep=2, keep_every_n=25)
    for s in range(0, 110, 10):
        mgr.save(s, _state(), {})
    assert mgr.steps() == [0, 50, 90, 100]


def test_retention_never_removes_what_it_just_saved(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, max_to_keep=1)
    mgr.save(10, _state(), {})
    path = mgr.save(3, _state(), {})
    assert path.is_dir() and mgr.steps() == [3, 10]
    mgr.save(11, _state(), {})
    assert mgr.steps() == [11]


def test_leftovers_cleaned_at_start_up(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _state(), {"v": 1})
    crashed = tmp_path / ".tmp-2-deadbeef"
    crashed.mkdir()
    (crashed / TENSORS_FILE).write_bytes(b"partial")
    (tmp_path / ".tmp-del-0-cafebabe").mkdir()
    (tmp_path / ".tmp-stray-file").write_bytes(b"x")
    mgr2 = CheckpointManager(tmp_path)
    assert _step_dirs(tmp_path) == ["step_00000001"]
    assert mgr2.restore()[1] == {"v": 1}


def test_interrupted_overwrite_is_rolled_back_at_start_up(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(4, _state(), {"v": "old"})
    # simulate a crash after the old checkpoint was moved aside but before the new one landed
    os.rename(mgr.step_dir(4), tmp_path / ".old-4-0123abcd")
    (tmp_path / ".tmp-4-89abcdef").mkdir()
    mgr2 = CheckpointManager(tmp_path)
    assert _step_dirs(tmp_path) == ["step_00000004"]
    assert mgr2.restore(4)[1] == {"v": "old"}


def test_existing_step_needs_overwrite(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(3, _state(), {"v": "old"})
    with pytest.raises(CheckpointError, match=r"step 3 already exists.*overwrite=True"):
        mgr.save(3, _state(2.0), {"v": "new"})
    assert mgr.restore(3)[1] == {"v": "old"}
    mgr.save(3, _state(2.0), {"v": "new"}, overwrite=True)
    tensors, meta = mgr.restore(3)
    assert meta == {"v": "new"}
    _assert_bit_exact(tensors, _state(2.0))
    assert _step_dirs(tmp_path) == ["step_00000003"]


class _Boom(RuntimeError):
    pass


def _fail_on_call(n: int, real):  # type: ignore[no-untyped-def]
    calls = {"n": 0}

    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == n:
            raise _Boom(f"injected failure on call {n}")
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("failing_call", [1, 2, 3])
def test_failure_during_save_leaves_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overwrite: bool, failing_call: int
) -> None:
    # fsync calls in save: 1 tensors file, 2 manifest, 3 tmp dir, (4 parent dir, after the rename)
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _state(), {"v": 1})
    target = 1 if overwrite else 2
    monkeypatch.setattr(os, "fsync", _fail_on_call(failing_call, os.fsync))
    with pytest.raises(_Boom):
        mgr.save(target, _state(3.0), {"v": 2}, overwrite=overwrite)
    monkeypatch.undo()
    assert _step_dirs(tmp_path) == ["step_00000001"]  # no partial step_ dir, no tmp leftovers
    tensors, meta = CheckpointManager(tmp_path).restore()
    assert meta == {"v": 1}
    _assert_bit_exact(tensors, _state())


def test_failed_rename_during_overwrite_puts_the_old_checkpoint_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # renames in save(overwrite=True): 1 old step dir aside, 2 tmp dir into place
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _state(), {"v": "old"})
    monkeypatch.setattr(os, "rename", _fail_on_call(2, os.rename))
    with pytest.raises(_Boom):
        mgr.save(1, _state(3.0), {"v": "new"}, overwrite=True)
    monkeypatch.undo()
    assert _step_dirs(tmp_path) == ["step_00000001"]
    assert mgr.restore(1)[1] == {"v": "old"}


def test_failure_inside_safetensors_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_write(tensors, filename, metadata=None):  # type: ignore[no-untyped-def]
        Path(filename).write_bytes(b"\x00" * 10)
        raise OSError(28, "No space left on device")

    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _state(), {"v": 1})
    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(OSError, match="No space left"):
        mgr.save(2, _state(), {"v": 2})
    assert _step_dirs(tmp_path) == ["step_00000001"]
    assert mgr.latest_step() == 1


def test_flipped_byte_is_detected(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _state(), {})
    f = mgr.step_dir(1) / TENSORS_FILE
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01  # inside the tensor payload: safetensors itself would not notice
    f.write_bytes(bytes(data))
    corrupt = r"tensors\.safetensors is corrupt: SHA-256 is [0-9a-f]{64}, the manifest says [0-9a-f]{64}"
    with pytest.raises(CheckpointError, match=corrupt):
        mgr.restore(1)


def test_truncated_tensor_file_is_detected(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _state(), {})
    f = mgr.step_dir(1) / TENSORS_FILE
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match=r"tensors\.safetensors has \d+ bytes, the manifest says \d+"):
        mgr.restore(1)
    f.unlink()
    with pytest.raises(CheckpointError, match=r"tensors\.safetensors is listed in the manifest but missing"):
        mgr.restore(1)


def test_truncated_manifest_is_detected(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _state(), {})
    m = mgr.step_dir(1) / MANIFEST_FILE
    m.write_bytes(m.read_bytes()[: len(m.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match=r"manifest\.json is not a valid checkpoint manifest.*Invalid JSON"):
        mgr.restore(1)


def test_manifest_with_unknown_key_is_rejected(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _state(), {})
    m = mgr.step_dir(1) / MANIFEST_FILE
    doc = json.loads(m.read_text())
    doc["tensorz"] = {}
    m.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"manifest\.json is not a valid.*tensorz.*Extra inputs"):
        mgr.restore(1)


def test_manifest_disagreeing_with_tensors_names_the_key(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _state(), {})
    m = mgr.step_dir(1) / MANIFEST_FILE
    doc = json.loads(m.read_text())
    doc["tensors"]["params/host/fc1/bias"]["shape"] = [5]
    m.write_text(json.dumps(doc))
    mismatch = r"'params/host/fc1/bias' .* float32 \[4\], but the manifest says float32 \[5\]"
    with pytest.raises(CheckpointError, match=mismatch):
        mgr.restore(1)
    doc["tensors"]["params/host/fc1/bias"]["shape"] = [4]
    doc["tensors"]["ghost"] = {"dtype": "float32", "shape": [1]}
    m.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"missing keys \['ghost'\]"):
        mgr.restore(1)


def test_manifest_file_names_cannot_escape(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _state(), {})
    m = mgr.step_dir(1) / MANIFEST_FILE
    doc = json.loads(m.read_text())
    doc["files"]["../secret"] = doc["files"][TENSORS_FILE]
    m.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"lists file '\.\./secret'"):
        mgr.restore(1)


def test_missing_step_lists_available(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match="holds no step_"):
        mgr.restore()
    mgr.save(2, _state(), {})
    mgr.save(4, _state(), {})
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 3 .*available steps: \[2, 4\]"):
        mgr.restore(3)


def test_restore_with_expected(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    state = _state()
    mgr.save(1, state, {})
    expected = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    tensors, _ = mgr.restore(1, expected=expected)
    _assert_bit_exact(tensors, state)
    wrong = dict(expected)
    del wrong["alpha"]
    wrong["new/seed/weight"] = ((2, 2), torch.float32)
    wrong["params/host/fc1/weight"] = ((4, 5), torch.float32)
    wrong["opt/step"] = ((), torch.float32)
    with pytest.raises(CheckpointError) as info:
        mgr.restore(1, expected=wrong)
    msg = str(info.value)
    assert "missing keys ['new/seed/weight']" in msg
    assert "unexpected keys ['alpha']" in msg
    assert "'params/host/fc1/weight': shape (4, 3), expected (4, 5)" in msg
    assert "'opt/step': dtype torch.int64, expected torch.float32" in msg


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="max_to_keep"):
        CheckpointManager(tmp_path, max_to_keep=0)
    with pytest.raises(CheckpointError, match="keep_every_n"):
        CheckpointManager(tmp_path, keep_every_n=True)  # type: ignore[arg-type]
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        CheckpointManager(tmp_path / "file")
    mgr = CheckpointManager(tmp_path / "ok")
    cases = [
        ((-1, {}, {}), "step must be"),
        ((1.0, {}, {}), "step must be"),
        ((1, {"": torch.zeros(1)}, {}), "key '' is invalid"),
        ((1, {"__metadata__": torch.zeros(1)}, {}), "reserves"),
        ((1, {"a": [1.0]}, {}), "not a torch.Tensor"),
        ((1, {"a": torch.zeros(2, 2).to_sparse()}, {}), "to_dense"),
        ((1, {"a": torch.zeros(1, dtype=torch.complex128)}, {}), "dtype torch.complex128"),
        ((1, {}, {"t": torch.zeros(1)}), "not JSON data.*tolist"),
        ((1, {}, {"x": {"y": {1, 2}}}), "not JSON data"),
        ((1, {}, {"x": (1, 2)}), "tuples become lists"),
        ((1, {}, {"x": [1, (2,)]}), "tuples become lists"),
        ((1, {}, {"x": {1: "a"}}), "non-str keys"),
        ((1, {}, [("a", 1)]), "metadata must be a mapping"),
    ]
    for args, msg in cases:
        with pytest.raises(CheckpointError, match=msg):
            mgr.save(*args)  # type: ignore[arg-type]
    assert _step_dirs(tmp_path / "ok") == []


def test_error_hierarchy() -> None:
    assert issubclass(CheckpointError, EsperError) and issubclass(CheckpointError, OSError)


def test_never_pickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("pickle-based torch.save/torch.load must not be used")

    monkeypatch.setattr(torch, "save", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _state(), {})
    mgr.restore(1)
