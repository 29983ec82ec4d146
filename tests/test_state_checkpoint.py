"""Saving and restoring a `State`: the identity on good checkpoints, a `CheckpointError` naming the
tensor on every checkpoint that does not fit the host it is restored into, and never a silent NaN."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import esper_fn as ef
from esper_fn.checkpoint import MANIFEST_FILE, TENSORS_FILE, CheckpointManager, Manifest, TensorEntry

HOST = ef.hosts.mlp((6, 5, 3))
X = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _assert_same_state(a: ef.State, b: ef.State) -> None:
    for attr in ("params_flat", "buffers_flat", "opt_flat"):
        fa, fb = getattr(a, attr), getattr(b, attr)
        assert list(fa) == list(fb), attr  # key order included: resumes are bit-exact
        for k in fa:
            assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
            assert _bits(fa[k]) == _bits(fb[k]), k
    assert list(a.slots.keys()) == list(b.slots.keys())
    for k in a.slots.keys():
        assert torch.equal(a.slots[k], b.slots[k]), k
    assert (a.slot_names, a.blueprints, a.n_seeds, a.optimizer) == (b.slot_names, b.blueprints, b.n_seeds, b.optimizer)


def _grown(ops: list[str], seed: int = 0, host: ef.Host = HOST) -> ef.State:
    """A state driven through `ops` (germinate/advance/tick/train/prune/fossilize at slot fc1)."""
    g = torch.Generator().manual_seed(seed)
    s = ef.init(host, optimizer=ef.optim.adam({"host": 1e-2, "seeds": 3e-3}), generator=g)
    for op in ops:
        stage = s.stage("fc1")
        if op == "germinate" and stage == ef.Stage.DORMANT:
            s = ef.germinate(s, "fc1", "lora_r4", generator=g, tempo=1)
        elif op == "width" and stage == ef.Stage.DORMANT:
            s = ef.germinate(s, "fc1", "width_k4", generator=g, tempo=1)
        elif op == "advance" and stage in (ef.Stage.GERMINATED, ef.Stage.TRAINING, ef.Stage.BLENDING):
            s = ef.advance(s, "fc1", force=True)
        elif op == "fossilize" and stage == ef.Stage.HOLDING:
            s = ef.fossilize(s, "fc1", force=True)
        elif op == "prune" and stage in ef.LIVE_STAGES:
            s = ef.prune(s, "fc1")
        elif op == "tick":
            s = ef.tick(s)
        elif op == "train":
            s, _ = ef.train_step(s, X, Y)
    return s


OPS = st.lists(st.sampled_from(["germinate", "width", "advance", "fossilize", "prune", "tick", "train"]),
               max_size=14)


@settings(max_examples=15)
@given(ops=OPS, seed=st.integers(0, 3))
def test_save_then_restore_state_is_the_identity(ops, seed):
    s = _grown(ops, seed)
    with tempfile.TemporaryDirectory() as d:
        mgr = CheckpointManager(d)
        mgr.save(3, s, {"note": "mine", "epoch": 3})
        r, meta = mgr.restore_state(HOST)
        assert meta == {"note": "mine", "epoch": 3}
        _assert_same_state(s, r)
        # and the restored state trains exactly as the saved one does
        a, _ = ef.train_step(s, X, Y)
        b, _ = ef.train_step(r, X, Y)
        _assert_same_state(a, b)
    tensors, meta = ef.state_to_tensors(s)
    _assert_same_state(s, ef.state_from_tensors(HOST, tensors, meta))


def test_converters_are_public_and_the_layout_is_the_runners():
    assert ef.state_to_tensors is ef.checkpoint.state_to_tensors
    assert ef.state_from_tensors is ef.checkpoint.state_from_tensors
    s = _grown(["germinate", "advance", "train"])
    with tempfile.TemporaryDirectory() as d:
        mgr = CheckpointManager(d)
        rng = torch.Generator().manual_seed(5).get_state()
        mgr.save(1, s, {"run": {"epoch": 1}}, extra={"rng/data": rng})
        tensors, meta = mgr.restore(1)
    flat, state_meta = ef.state_to_tensors(s)
    # `esper_fn.run` writes "state/<key>" tensors beside its own and metadata {"state": ..., "run": ...}
    assert list(tensors) == [f"state/{k}" for k in flat] + ["rng/data"]
    assert meta == {"state": state_meta, "run": {"epoch": 1}}
    assert torch.equal(tensors["rng/data"], rng)


def test_save_state_refuses_a_state_key_in_metadata_and_stacked_states(tmp_path):
    s = _grown([])
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(ef.CheckpointError, match="'state'"):
        mgr.save(1, s, {"state": 1})
    with pytest.raises(ef.CheckpointError, match="unstack"):
        mgr.save(1, ef.stack([s, s]))
    with pytest.raises(ef.CheckpointError, match="extra"):
        mgr.save(1, s, extra={"state/params/x": torch.zeros(1)})
    mgr.save(1, {"a": torch.zeros(1)}, {"k": 1})
    with pytest.raises(ef.CheckpointError, match="holds no State"):
        mgr.restore_state(HOST, 1)


def _wrapped(width: int) -> ef.Host:
    torch.manual_seed(0)  # the module's own init; the host reads its weights
    model = nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3))
    return ef.wrap(model, X, slots=[nn.Linear])


def test_restoring_into_a_host_of_other_widths_names_the_tensor(tmp_path):
    small, wide = _wrapped(4), _wrapped(7)
    assert small.name == wide.name and small.config == wide.config  # nothing but the shapes differ
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, ef.init(small), {})
    with pytest.raises(ef.CheckpointError) as e:
        mgr.restore_state(wide, 1)
    msg = str(e.value)
    assert "params/host/0/weight" in msg and "[4, 6]" in msg and "[7, 6]" in msg and "host it was saved from" in msg
    # the wide checkpoint into the small host: as wide as a width growth would make it, but no seed
    # was ever grafted, so it cannot have grown
    mgr.save(2, ef.init(wide), {})
    with pytest.raises(ef.CheckpointError, match=r"params/host/0/weight.*\[7, 6\].*\[4, 6\]"):
        mgr.restore_state(small, 2)


def test_a_grown_host_restores_and_a_shrunk_one_does_not(tmp_path):
    grown = _grown(["width", "advance", "advance", "tick", "advance", "fossilize", "train"])
    assert grown.params_flat[("host", "fc1", "weight")].shape == (9, 6)  # 5 + 4 units
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, grown, {})
    _assert_same_state(grown, mgr.restore_state(HOST, 1)[0])
    tensors, meta = ef.state_to_tensors(grown)
    # a growth that is not the same on both Linears is no width growth
    bad = dict(tensors)
    bad["params/host/fc2/weight"] = torch.zeros(3, 8)
    with pytest.raises(ef.CheckpointError, match=r"params/host/fc2/weight"):
        ef.state_from_tensors(HOST, bad, meta)


def _rewrite(mgr: CheckpointManager, step: int, tensors: dict, metadata: dict | None = None) -> None:
    """Replace checkpoint `step`'s tensors (and metadata) and rewrite its manifest to match, so that
    only the check against the host can notice."""
    d = mgr.step_dir(step)
    manifest = Manifest.model_validate_json((d / MANIFEST_FILE).read_text())
    safetensors.torch.save_file(tensors, str(d / TENSORS_FILE))
    from esper_fn.checkpoint import _file_entry

    new = manifest.model_copy(update={
        "files": {TENSORS_FILE: _file_entry(d / TENSORS_FILE)},
        "tensors": {k: TensorEntry(dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape))
                    for k, t in tensors.items()},
        "metadata": manifest.metadata if metadata is None else metadata,
    })
    (d / MANIFEST_FILE).write_text(new.model_dump_json())


def test_a_float64_tensor_with_a_matching_manifest_is_a_checkpoint_error(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _grown(["germinate", "advance", "train"]), {})
    tensors, _ = mgr.restore(1)
    tensors["state/params/host/fc1/weight"] = tensors["state/params/host/fc1/weight"].double()
    _rewrite(mgr, 1, tensors)
    assert mgr.restore(1)[0]["state/params/host/fc1/weight"].dtype == torch.float64  # the file itself is valid
    with pytest.raises(ef.CheckpointError) as e:
        mgr.restore_state(HOST, 1)
    assert "params/host/fc1/weight" in str(e.value) and "float64" in str(e.value) and "float32" in str(e.value)


@pytest.mark.parametrize("key,value", [
    ("params/host/fc1/weight", float("nan")),
    ("opt/mu/host/fc2/bias", float("inf")),
    ("opt/nu/seeds/fc1/A", float("nan")),
    ("params/seeds/fc1/B", -float("inf")),
])
def test_a_non_finite_parameter_or_moment_is_never_restored(tmp_path, key, value):
    s = _grown(["germinate", "advance", "train"])
    tensors, meta = ef.state_to_tensors(s)
    bad = dict(tensors)
    bad[key] = bad[key].clone()
    bad[key].view(-1)[0] = value
    with pytest.raises(ef.NonFiniteCheckpointError) as e:
        ef.state_from_tensors(HOST, bad, meta)
    assert isinstance(e.value, ef.CheckpointError) and e.value.key == key and key in str(e.value)
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, s, {})
    _rewrite(mgr, 1, {f"state/{k}": v for k, v in bad.items()})
    with pytest.raises(ef.NonFiniteCheckpointError, match="restore an earlier step"):
        mgr.restore_state(HOST, 1)


def test_falling_back_to_the_latest_finite_checkpoint(tmp_path):
    """The loop `CheckpointManager.restore_state` documents for resuming past a NaN."""
    mgr = CheckpointManager(tmp_path)
    states = {}
    s = _grown(["germinate", "advance"])
    for step in (1, 2, 3):
        s, _ = ef.train_step(s, X, Y)
        states[step] = s
        mgr.save(step, s, {"epoch": step})
    tensors, _ = mgr.restore(3)
    tensors["state/params/host/fc1/bias"] = torch.full_like(tensors["state/params/host/fc1/bias"], float("nan"))
    _rewrite(mgr, 3, tensors)
    skipped = []
    for step in reversed(mgr.steps()):
        try:
            state, meta = mgr.restore_state(HOST, step)
            break
        except ef.NonFiniteCheckpointError as err:
            skipped.append((step, err.key))
    assert skipped == [(3, "params/host/fc1/bias")] and step == 2 and meta == {"epoch": 2}
    _assert_same_state(state, states[2])


def test_structural_damage_names_what_is_wrong():
    s = _grown(["germinate", "advance", "train"])
    tensors, meta = ef.state_to_tensors(s)

    def fails(t, m, *words):
        with pytest.raises(ef.CheckpointError) as e:
            ef.state_from_tensors(HOST, t, m)
        for w in words:
            assert w in str(e.value), (w, str(e.value))

    fails({k: v for k, v in tensors.items() if k != "opt/nu/seeds/fc1/A"}, meta, "opt/nu/seeds/fc1/A", "lacks")
    fails({**tensors, "params/host/extra": torch.zeros(2)}, meta, "params/host/extra")
    fails({**tensors, "slots/stage": torch.tensor([0, 9, 0])}, meta, "slots/stage", "9")
    fails({**tensors, "slots/stage": torch.tensor([0, 0, 0])}, meta, "fc1", "DORMANT")  # a seed in a DORMANT slot
    fails({**tensors, "slots/alpha": torch.zeros(3, dtype=torch.float64)}, meta, "slots/alpha", "float64")
    fails(tensors, {**meta, "blueprints": [None, "nope@1.0.0", None]}, "nope@1.0.0", "register")
    fails(tensors, {**meta, "blueprints": [None, "lora_r8@1.0.0", None]}, "'fc1'", "lora_r8@1.0.0", "does not fit")
    fails({**tensors, "params/seeds/fc1/A": torch.zeros(4, 7)}, meta, "params/seeds/fc1/A", "[4, 7]")
    fails({**tensors, "opt/step/seeds/fc1/A": torch.zeros(1)}, meta, "opt/step/seeds/fc1/A", "float32 []")
    fails(tensors, {**meta, "slot_names": ["input", "fc9", "fc2"]}, "fc9", "slot")
    fails(tensors, {**meta, "optimizer": {**meta["optimizer"], "mirrors": ["step", "mu"]}}, "mirrors")
    fails(tensors, {k: v for k, v in meta.items() if k != "opt_keys"}, "opt_keys")
    fails(tensors, {**meta, "n_seeds": "1"}, "n_seeds")
    fails(tensors, [1, 2], "metadata")


def _json_values():
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.floats(allow_nan=False, width=32),
                     st.text(max_size=6), st.sampled_from(["fc1", "lora_r4@1.0.0", "step", "adam"]))
    return st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                        max_leaves=6)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _set(value, path, new):
    if not path:
        return new
    value = json.loads(json.dumps(value))
    node = value
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = new
    return value


CORRUPTIONS = st.sampled_from(["metadata", "drop", "dtype", "shape", "nan", "flip"])


@settings(max_examples=40)
@given(kind=CORRUPTIONS, pick=st.integers(0, 10_000), new=_json_values(), ops=OPS)
def test_a_corrupted_checkpoint_raises_checkpoint_error_and_nothing_else(kind, pick, new, ops):
    """Whatever is done to a checkpoint, a verified restore returns a state or raises
    `CheckpointError`; damage to the structure (a tensor dropped, its dtype or shape changed, a NaN
    written, a byte flipped) always raises."""
    s = _grown(ops)
    with tempfile.TemporaryDirectory() as d:
        mgr = CheckpointManager(d)
        mgr.save(1, s, {"epoch": 1})
        tensors, meta = mgr.restore(1)
        keys = list(tensors)
        key = keys[pick % len(keys)]
        if kind == "metadata":
            paths = list(_paths(meta["state"]))
            meta = {**meta, "state": _set(meta["state"], paths[pick % len(paths)], new)}
            _rewrite(mgr, 1, tensors, meta)
        elif kind == "flip":
            path = mgr.step_dir(1) / TENSORS_FILE
            data = bytearray(path.read_bytes())
            data[pick % len(data)] ^= 0x10
            path.write_bytes(bytes(data))
        else:
            t = tensors[key]
            if kind == "drop":
                del tensors[key]
            elif kind == "dtype":
                tensors[key] = t.to(torch.float64 if t.dtype != torch.float64 else torch.float32)
            elif kind == "shape":
                tensors[key] = torch.zeros(*t.shape, 2, dtype=t.dtype)
            elif kind == "nan":
                if not t.is_floating_point() or not t.numel() or key.startswith("state/slots/"):
                    return  # a NaN alpha is a slot-record error, tested above; here: parameters and moments
                tensors[key] = t.clone()
                tensors[key].view(-1)[pick % t.numel()] = float("nan")
            _rewrite(mgr, 1, tensors)
        try:
            r, _ = mgr.restore_state(HOST, 1)
        except ef.CheckpointError:
            return
        assert kind == "metadata", f"{kind} of {key} was restored silently"
        r.slot_specs()  # whatever was accepted is a usable state
        ef.apply(r, X)


@pytest.mark.parametrize("damage", ["float64", "nan"])
def test_resuming_a_run_from_a_damaged_checkpoint_is_a_checkpoint_error(tmp_path, crash_at, damage):
    """`esper-fn grow --resume`'s path (`esper_fn.run.grow`) goes through the same verification."""
    from esper_fn.run import RunConfig, grow

    cfg = RunConfig(task="mnist1d", host="mlp-impaired", controller="static", epochs=3, checkpoint_every=1)
    with pytest.raises(crash_at.error):
        grow(cfg, tmp_path / "run", progress=False, on_epoch_start=crash_at(2))
    mgr = CheckpointManager(tmp_path / "run" / "checkpoints")
    tensors, _ = mgr.restore(2)
    key = "state/params/host/fc1/weight"
    tensors[key] = tensors[key].double() if damage == "float64" else torch.full_like(tensors[key], float("nan"))
    _rewrite(mgr, 2, tensors)
    if damage == "nan":  # the run goes back to the latest finite checkpoint and says so
        from esper_fn.events import Resumed, read_events

        s = grow(cfg, tmp_path / "run", resume=True, progress=False)
        (r,) = [e for e in read_events(tmp_path / "run" / "events.jsonl") if isinstance(e, Resumed)]
        assert s.epochs == 3 and r.from_step == 1 and r.skipped == [2] and "params/host/fc1/weight" in r.reason
        return
    with pytest.raises(ef.CheckpointError, match="params/host/fc1/weight"):
        grow(cfg, tmp_path / "run", resume=True, progress=False)
