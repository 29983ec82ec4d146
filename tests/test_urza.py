"""Urza, the seed library: round trips, warm starts, corruption, garbage collection, two writers at
once (real processes), the `esper-fn library` commands and `grow --library`.

Every test uses a real SQLite index and real safetensors files in a temporary directory."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import esper_fn as ef
from esper_fn._errors import EsperError, LibraryError, SeedNotFoundError, WarmStartError
from esper_fn._host import SlotSpec
from esper_fn.urza import Library, SeedArtifact, fit, warm_start

INPUT = SlotSpec("input", "vector", (40,))


def _trained_state(generator, host="mlp-impaired", slot="input", blueprint="conv1d_k5"):
    """A state whose seed at `slot` has non-zero (as if trained) weights, so a warm start is visible."""
    s = ef.init(ef.hosts.preset(host), generator=generator)
    s = ef.germinate(s, slot, blueprint, generator=generator)
    params = dict(s.params_flat)
    for k, v in s.params_flat.items():
        if k[0] == "seeds":
            params[k] = torch.randn(v.shape, generator=generator) * 0.3
    return s.replace(params_flat=params)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_store_load_round_trip_is_bit_exact_and_records_provenance(tmp_path, generator):
    s = _trained_state(generator)
    lib = Library(tmp_path / "lib")
    rec = lib.store_seed(s, "input", host="mlp-impaired", task="mnist1d", contribution=0.25, epochs=11, run_id="r1")
    assert (rec.blueprint, rec.blueprint_name, rec.blueprint_version) == ("conv1d_k5@1.0.0", "conv1d_k5", "1.0.0")
    assert (rec.slot, rec.slot_kind, rec.slot_shape, rec.host, rec.task) == ("input", "vector", [40], "mlp-impaired",
                                                                               "mnist1d")
    assert (rec.fate, rec.contribution, rec.epochs, rec.run_id, rec.seed_index, rec.n_params) == (
        "FOSSILIZED", 0.25, 11, "r1", 0, 177)
    path = lib.artifact_path(rec.sha256)
    assert path.name == f"{rec.sha256}.safetensors" and path.stat().st_size == rec.size
    import hashlib

    assert hashlib.sha256(path.read_bytes()).hexdigest() == rec.sha256
    art = lib.load(rec.id[:5])  # a unique prefix is enough
    assert art.record == rec == lib.get(rec.id)
    assert list(art.params) == ["w1", "b1", "w2", "b2"] and art.buffers == {}
    for name, v in s.seed_params("input").items():
        assert _bits(art.params[name]) == _bits(v)
    # A second index connection (another process would open one too) sees the same record.
    assert Library(tmp_path / "lib", create=False).records() == [rec]


def test_same_tensors_are_stored_once_and_a_resumed_run_does_not_duplicate(tmp_path, generator):
    s = _trained_state(generator)
    lib = Library(tmp_path / "lib")
    a = lib.store_seed(s, "input", run_id="run-a")
    b = lib.store_seed(s, "input", run_id="run-b")
    again = lib.store_seed(s, "input", run_id="run-a")  # same run, seed and fate: the existing record
    assert again == a and a.id != b.id and a.sha256 == b.sha256
    assert len(lib) == 2 and len(list(lib.artifacts_dir.iterdir())) == 1
    lib.remove(a.id)  # the file is still referenced by b
    assert lib.load(b.id).record == b
    lib.remove(b.id)
    assert len(lib) == 0 and list(lib.artifacts_dir.iterdir()) == []


def test_records_filter(tmp_path, generator):
    lib = Library(tmp_path / "lib")
    s = _trained_state(generator)
    lib.store_seed(s, "input", task="mnist1d", run_id="a")
    lib.store_seed(s, "input", task="digits", run_id="b", fate="PRUNED")
    lora = _trained_state(generator, slot="fc1", blueprint="lora_r4")
    lib.store_seed(lora, "fc1", task="mnist1d", run_id="c")
    assert [r.run_id for r in lib.records(blueprint="conv1d_k5")] == ["a", "b"]
    assert [r.run_id for r in lib.records(blueprint="lora_r4@1.0.0")] == ["c"]
    assert [r.run_id for r in lib.records(task="mnist1d")] == ["a", "c"]
    assert [r.run_id for r in lib.records(fate="PRUNED")] == ["b"]
    assert lib.records(host="nope") == []


def test_warm_start_grafts_the_stored_weights_without_changing_the_function(tmp_path, generator):
    donor = _trained_state(generator)
    lib = Library(tmp_path / "lib")
    rec = lib.store_seed(donor, "input", run_id="donor")
    # Another host with the same [40] input slot: cnn-impaired.
    s = ef.init(ef.hosts.preset("cnn-impaired"), generator=torch.Generator().manual_seed(1))
    x = torch.randn(8, 40, generator=generator)
    before = {k: v.clone() for k, v in s.params_flat.items()}
    warm = warm_start(s, "input", rec.id, library=tmp_path / "lib", tempo=1)
    assert s.params_flat.keys() == before.keys()
    assert all(torch.equal(s.params_flat[k], v) for k, v in before.items())  # the input state is untouched
    assert warm.blueprints[0] == "conv1d_k5@1.0.0" and warm.stage("input") == ef.Stage.GERMINATED
    for name, v in donor.seed_params("input").items():
        assert torch.equal(warm.seed_params("input")[name], v)
        assert not torch.equal(warm.opt_flat[("mu", "seeds", "input", name)], v)  # fresh optimizer state
        assert not warm.opt_flat[("mu", "seeds", "input", name)].any()
    assert torch.equal(ef.apply(warm, x), ef.apply(s, x))  # germination never changes the function
    live = ef.tick(ef.advance(ef.advance(warm, "input"), "input", force=True))  # BLENDING at alpha 1
    assert not torch.allclose(ef.apply(live, x), ef.apply(s, x))  # the trained weights arrive when it blends
    # A loaded artifact works as well as an id; naming the same blueprint is fine.
    art = lib.load(rec.id)
    again = warm_start(s, "input", art, blueprint="conv1d_k5")
    assert all(torch.equal(again.params_flat[k], v) for k, v in warm.params_flat.items())
    # A stacked state gets the stored weights on every host.
    st = warm_start(ef.stack([s, s]), "input", art)
    assert torch.equal(st.seed_params("input")["w1"][1], donor.seed_params("input")["w1"])


def test_warm_start_refusals_are_typed_and_say_why(tmp_path, generator):
    lib = Library(tmp_path / "lib")
    rec = lib.store_seed(_trained_state(generator), "input", run_id="donor")
    s = ef.init(ef.hosts.preset("cnn-impaired"), generator=generator)
    with pytest.raises(WarmStartError, match=r"does not fit slot 'conv1'.*w1 is F32 \[16, 1, 5\], the slot needs F32 "
                                             r"\[16, 4, 5\]") as e:
        warm_start(s, "conv1", rec.id, library=lib)
    assert isinstance(e.value, ValueError) and isinstance(e.value, EsperError) and isinstance(e.value, ef.GraftError)
    with pytest.raises(WarmStartError, match="'conv1d_k5@1.0.0' seed.*'conv1d_k3@1.0.0'"):
        warm_start(s, "input", rec.id, library=lib, blueprint="conv1d_k3")
    with pytest.raises(WarmStartError, match="library=PATH"):
        warm_start(s, "input", rec.id)
    with pytest.raises(SeedNotFoundError, match="no seed 'ffff'") as e:
        warm_start(s, "input", "ffff", library=lib)
    assert isinstance(e.value, LookupError) and isinstance(e.value, LibraryError)
    with pytest.raises(LibraryError, match="no seed library"):
        warm_start(s, "input", rec.id, library=tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()  # a typo never creates an empty library
    with pytest.raises(ef.BlueprintError, match="name a blueprint.*warm_start"):
        ef.germinate(s, "input")
    with pytest.raises(ef.IllegalTransitionError):  # the lifecycle is checked before any file is read
        warm_start(ef.germinate(s, "input", "conv1d_k5"), "input", "ffff", library=lib)
    # `candidates` lists exactly the stored seeds `fit` accepts at a slot.
    assert [r.id for r in lib.candidates(s, "input")] == [rec.id]
    assert lib.candidates(s, "conv1") == []
    art = lib.load(rec.id)
    with pytest.raises(WarmStartError):
        fit(art, ef.blueprints.get("conv1d_k5"), s.spec("conv1"))
    with pytest.raises(WarmStartError, match="w1 is .*the slot needs"):  # germinate checks weights given to it
        bad = {k: v[..., :1] if k == "w1" else v for k, v in art.params.items()}
        ef.germinate(s, "input", "conv1d_k5", weights=(bad, art.buffers))


def test_a_corrupt_artifact_is_a_typed_error_naming_entry_and_file(tmp_path, generator):
    lib = Library(tmp_path / "lib")
    good = lib.store_seed(_trained_state(generator), "input", run_id="good")
    bad = lib.store_seed(_trained_state(generator), "input", run_id="bad")
    path = lib.artifact_path(bad.sha256)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit pattern in the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(LibraryError, match=rf"seed {bad.id}.*{path.name} is corrupt: SHA-256") as e:
        lib.load(bad.id)
    assert isinstance(e.value, OSError)
    s = ef.init(ef.hosts.preset("mlp-impaired"), generator=generator)
    with pytest.raises(LibraryError, match=bad.id):
        warm_start(s, "input", bad.id, library=lib)
    assert lib.load(good.id).record == good  # other entries are unaffected
    problems = lib.verify()
    assert [(p.id, Path(p.path).name) for p in problems] == [(bad.id, path.name)]
    assert "corrupt" in problems[0].reason


def test_missing_and_truncated_artifacts_and_a_forged_index(tmp_path, generator):
    lib = Library(tmp_path / "lib")
    recs = [lib.store_seed(_trained_state(generator), "input", run_id=f"r{i}") for i in range(4)]
    lib.artifact_path(recs[0].sha256).unlink()
    p1 = lib.artifact_path(recs[1].sha256)
    p1.write_bytes(p1.read_bytes()[:-10])
    with pytest.raises(LibraryError, match=rf"seed {recs[0].id}.*is missing"):
        lib.load(recs[0].id)
    with pytest.raises(LibraryError, match=rf"seed {recs[1].id}.*bytes, the index recorded {recs[1].size}"):
        lib.load(recs[1].id)
    # An index row rewritten to claim other tensors (the file itself intact) is caught too.
    with sqlite3.connect(lib.index_path) as con:
        forged = {**{k: v.model_dump() for k, v in recs[2].tensors.items()}, "params/w1": {"dtype": "F32",
                                                                                        "shape": [16, 4, 5]}}
        con.execute("UPDATE seeds SET tensors = ? WHERE id = ?", (json.dumps(forged), recs[2].id))
    with pytest.raises(LibraryError, match="other tensors than the index recorded"):
        lib.load(recs[2].id)
    # A stray temporary file of a writer that crashed mid-write, and an artifact no entry references.
    (lib.artifacts_dir / ".tmp-deadbeef-0000").write_bytes(b"partial")
    orphan = lib.artifact_path("0" * 64)
    orphan.write_bytes(b"x" * 100)
    found = {(p.id, Path(p.path).name) for p in lib.verify()}
    assert found == {(recs[0].id, f"{recs[0].sha256}.safetensors"), (recs[1].id, p1.name),
                     (recs[2].id, f"{recs[2].sha256}.safetensors"), (None, ".tmp-deadbeef-0000"),
                     (None, orphan.name)}
    dry = lib.gc(drop_bad=True, dry_run=True)
    assert dry.dry_run and sorted(dry.dropped) == sorted(r.id for r in recs[:3]) and len(lib) == 4
    assert orphan.exists()
    rep = lib.gc()
    assert rep.orphans == [orphan.name] and rep.leftovers == [".tmp-deadbeef-0000"] and rep.dropped == []
    assert rep.freed_bytes == 107 and len(lib) == 4
    rep = lib.gc(drop_bad=True)
    assert sorted(rep.dropped) == sorted(r.id for r in recs[:3])
    assert [r.id for r in lib.records()] == [recs[3].id] and lib.verify() == []
    assert sorted(p.name for p in lib.artifacts_dir.iterdir()) == [f"{recs[3].sha256}.safetensors"]


def test_a_corrupt_or_missing_index_is_a_typed_error(tmp_path):
    with pytest.raises(LibraryError, match="no seed library"):
        Library(tmp_path / "none", create=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "index.sqlite").write_bytes(b"this is not an sqlite database" * 100)
    with pytest.raises(LibraryError, match="index.sqlite could not be read"):
        Library(tmp_path / "bad")


def test_store_seed_refuses_an_empty_slot_and_a_stacked_state(tmp_path, generator):
    lib = Library(tmp_path / "lib")
    s = ef.init(ef.hosts.preset("mlp-impaired"), generator=generator)
    with pytest.raises(ef.GraftError, match="holds no seed"):
        lib.store_seed(s, "input")
    with pytest.raises(ef.GraftError, match="stacked"):
        lib.store_seed(ef.stack([s, s]), "input")
    with pytest.raises(ef.GraftError, match="fate"):
        lib.store_seed(_trained_state(generator), "input", fate="LOST")
    assert len(lib) == 0


_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from esper_fn._host import SlotSpec
    from esper_fn.urza import Library

    lib_path, tag, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    lib = Library(lib_path)
    spec = SlotSpec("input", "vector", (40,))
    (go.parent / f"ready-{tag}").touch()
    while not go.exists():
        time.sleep(0.005)
    g = torch.Generator().manual_seed(1 if tag == "a" else 2)
    for i in range(n):
        p = {"w1": torch.randn(16, 1, 5, generator=g), "b1": torch.randn(16, generator=g),
             "w2": torch.randn(1, 16, 5, generator=g), "b2": torch.randn(1, generator=g)}
        lib.put(p, blueprint="conv1d_k5@1.0.0", spec=spec, host="mlp-impaired", task="mnist1d",
                run_id=f"run-{tag}", seed_index=i, epochs=i, contribution=0.001 * i)
    shared = {"w1": torch.ones(16, 1, 5), "b1": torch.ones(16), "w2": torch.ones(1, 16, 5), "b2": torch.ones(1)}
    lib.put(shared, blueprint="conv1d_k5@1.0.0", spec=spec, host="mlp-impaired", run_id=f"run-{tag}",
            seed_index=n)
    print("stored", n + 1)
""")


def test_a_new_library_waits_for_another_process_holding_its_index(tmp_path):
    """Processes creating one library at once race for the lock WAL mode needs; SQLite answers that
    PRAGMA with "database is locked" without waiting, so the opener must retry, not fail."""
    import threading

    from esper_fn.urza import INDEX_FILE

    path = tmp_path / "lib"
    path.mkdir()
    other = sqlite3.connect(path / INDEX_FILE, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    other.execute("BEGIN IMMEDIATE")  # another process writing the new index (not yet in WAL mode) right now
    release = threading.Timer(0.5, lambda: other.execute("COMMIT"))
    release.start()
    try:
        t0 = time.monotonic()
        lib = Library(path)
        assert time.monotonic() - t0 >= 0.4  # it waited for the other writer
    finally:
        release.join()
        other.close()
    assert lib.records() == [] and lib.verify() == []


@pytest.mark.slow
def test_two_processes_writing_one_library_at_once_lose_nothing(tmp_path):
    lib_path, go, n = tmp_path / "lib", tmp_path / "go", 40
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    procs = [subprocess.Popen([sys.executable, str(script), str(lib_path), tag, str(n), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for tag in "ab"]
    deadline = time.monotonic() + 240
    while not all((tmp_path / f"ready-{t}").exists() for t in "ab"):  # both imported torch and opened the index
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:  # a writer died (or hung): stop the other, which waits for `go`, then report both
                p.kill()
            pytest.fail(f"a writer did not get ready: {[p.communicate() for p in procs]}")
        time.sleep(0.05)
    go.touch()  # both start writing now
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    lib = Library(lib_path, create=False)
    recs = lib.records()
    assert len(recs) == 2 * (n + 1)
    for tag in "ab":
        assert sorted(r.seed_index for r in recs if r.run_id == f"run-{tag}") == list(range(n + 1))
    spans = [[r.created for r in recs if r.run_id == f"run-{tag}"] for tag in "ab"]
    assert max(min(a) for a in spans) < min(max(a) for a in spans)  # the writers really overlapped in time
    assert lib.verify() == []
    # The identical seed both stored is one file; every other seed has its own.
    assert len(list(lib.artifacts_dir.iterdir())) == 2 * n + 1
    for r in recs:
        assert lib.load(r.id).record == r


def test_library_commands(tmp_path, generator, capsys):
    from esper_fn.cli import main

    lib = Library(tmp_path / "lib")
    rec = lib.store_seed(_trained_state(generator), "input", task="mnist1d", run_id="r1", contribution=0.1, epochs=9)
    assert main(["library", "list", str(lib.path)]) == 0
    out = capsys.readouterr().out
    assert rec.id in out and "conv1d_k5@1.0.0" in out and "+0.1000" in out and "1 seed(s)" in out
    assert main(["library", "list", str(lib.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["id"] == rec.id
    assert main(["library", "show", str(lib.path), rec.id[:4], "--verify"]) == 0
    out = capsys.readouterr().out
    assert f'"sha256": "{rec.sha256}"' in out and "artifact verified" in out
    assert main(["library", "verify", str(lib.path)]) == 0
    assert "1 ok, 0 bad" in capsys.readouterr().out
    p = lib.artifact_path(rec.sha256)
    p.write_bytes(p.read_bytes()[:-1] + b"\x00")
    assert main(["library", "verify", str(lib.path)]) == 1
    out = capsys.readouterr().out
    assert f"BAD {rec.id}" in out and "0 ok, 1 bad" in out
    assert main(["library", "show", str(lib.path), rec.id, "--verify"]) == 1  # a runtime failure, not usage
    assert "corrupt" in capsys.readouterr().err
    assert main(["library", "gc", str(lib.path), "--drop-bad"]) == 0
    assert "1 bad entry" in capsys.readouterr().out and len(lib) == 0
    assert main(["library", "show", str(lib.path), "nope"]) == 2
    assert "no seed 'nope'" in capsys.readouterr().err
    assert main(["library", "list", str(tmp_path / "missing")]) == 2
    assert "no seed library" in capsys.readouterr().err


def test_library_commands_do_not_import_torch(tmp_path, generator):
    lib = Library(tmp_path / "lib")
    lib.store_seed(_trained_state(generator), "input", run_id="r1")
    code = ("import sys\nfrom esper_fn.cli import main\n"
            f"assert main(['library', 'list', {str(lib.path)!r}]) == 0\n"
            f"assert main(['library', 'verify', {str(lib.path)!r}]) == 0\n"
            f"assert main(['library', 'gc', {str(lib.path)!r}]) == 0\n"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("False")


def test_grow_with_a_library_stores_what_it_fossilizes(tmp_path, capsys):
    """A schedule controller with no incubation, a one-epoch ramp and no hold fossilizes its first
    seed within six epochs; the run stores it, and a new host warm-starts from it."""
    from esper_fn.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text("controller: schedule\nschedule_every: 1\nepochs: 6\n"
                   "plateau: {incubate_epochs: 0, tempo: 1, hold_epochs: 0}\n")
    lib_path = tmp_path / "lib"
    rc = main(["grow", "--config", str(cfg), "--library", str(lib_path), "--out", str(tmp_path / "run"),
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lib = Library(lib_path, create=False)
    recs = lib.records()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(recs) == summary["fossilized"] >= 1
    rec = recs[0]
    assert rec.run_id == summary["run_id"] and rec.task == "mnist1d" and rec.host == "mlp-impaired"
    assert rec.fate == "FOSSILIZED" and rec.epochs is not None and 1 <= rec.epochs <= 5
    assert rec.contribution is not None and f"1 in {lib_path}" in out and rec.id in out
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    germ = next(e for e in events if e["kind"] == "germinated")
    foss = next(e for e in events if e["kind"] == "fossilized")
    assert rec.slot == germ["slot"] == foss["slot"] and rec.blueprint == germ["blueprint"]
    assert rec.epochs == foss["epoch"] - germ["epoch"]
    s = ef.init(ef.hosts.preset("mlp-impaired"), generator=torch.Generator().manual_seed(5))
    warm = warm_start(s, rec.slot, rec.id, library=lib_path)
    assert warm.blueprints[warm.index(rec.slot)] == rec.blueprint
