"""Devices and dtypes wherever data or state is created, over the `device` fixture.

`make test` runs these on the CPU with an explicit ``device="cpu"`` (and on CUDA too where it is
available); `make test-gpu` runs them on CUDA only (ESPER_FN_REQUIRE_CUDA=1). Dtype tests train
float64 and bfloat16 hosts; meta-device tests check germination without memory. The CUDA-only
tests prove that an epoch of train steps does not synchronise the device per batch
(`torch.cuda.set_sync_debug_mode`).
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from torch import nn

import esper_fn as ef
from esper_fn import tasks
from esper_fn.checkpoint import CheckpointManager
from esper_fn.run import RunConfig, grow, load_config
from esper_fn.training import TrainConfig, telemetry, train_epoch, train_epochs

pytestmark = pytest.mark.device

BATCH = TrainConfig(batch_size=50, eval_batch_size=2000)


def _task(n: int = 300, features: int = 40, classes: int = 10, seed: int = 0) -> tasks.Task:
    """A small learnable task (a random linear teacher), 60/20/20."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x @ torch.randn(features, classes, generator=g)).argmax(-1)
    return tasks.Task.from_arrays(x.numpy(), y.numpy(), name="teacher", seed=seed)


def _same(a: ef.State, b: ef.State) -> bool:
    """Every parameter, buffer and optimizer leaf equal, bit for bit, in value and dtype."""
    return all(fa.keys() == fb.keys() and all(torch.equal(v.cpu(), fb[k].cpu()) and v.dtype == fb[k].dtype
                                              for k, v in fa.items())
               for fa, fb in ((a.params_flat, b.params_flat), (a.buffers_flat, b.buffers_flat),
                              (a.opt_flat, b.opt_flat)))


def _placed(s: ef.State, device: torch.device, dtype: torch.dtype) -> None:
    """Assert where every tensor of `s` lives and in which dtype (step counts float32, slots on the CPU)."""
    for flat in (s.params_flat, s.buffers_flat):
        for k, v in flat.items():
            assert v.device.type == device.type, k
            assert v.dtype == (dtype if v.is_floating_point() else v.dtype), k
    for k, v in s.opt_flat.items():
        assert v.device.type == device.type, k
        assert v.dtype == (torch.float32 if k[0] == "step" else dtype), k
    assert all(v.device.type == "cpu" for v in s.slots.values())


# --- init, State.to, germination --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_init_and_seeds_follow_the_states_device_and_dtype(device, dtype):
    host = ef.hosts.preset("cnn-impaired")
    s = ef.init(host, generator=torch.Generator().manual_seed(0), device=device, dtype=dtype)
    assert s.device.type == device.type and s.dtype == dtype
    for slot, bid in (("input", "conv1d_k5"), ("conv1", "conv1d_dwsep"), ("fc", "lora_r4")):
        s = ef.germinate(s, slot, bid, generator=torch.Generator().manual_seed(1))
    _placed(s, device, dtype)
    # one generator, the same seed on every device and dtype (drawn on the CPU in float32, then cast)
    ref = ef.germinate(ef.init(host, generator=torch.Generator().manual_seed(0)), "input", "conv1d_k5",
                       generator=torch.Generator().manual_seed(1))
    for k, v in ref.seed_params("input").items():
        assert torch.equal(s.seed_params("input")[k].cpu(), v.to(dtype)), k


def test_state_to_moves_and_casts_and_leaves_its_input_alone(device):
    x, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
    s = ef.init(ef.hosts.preset("mlp-impaired"), generator=torch.Generator().manual_seed(0))
    s = ef.advance(ef.germinate(s, "fc1", "mlp_gelu", generator=torch.Generator().manual_seed(1)), "fc1")
    s, _ = ef.train_step(s, x, y)
    before = {k: v.clone() for k, v in s.params_flat.items()}
    moved = s.to(device)
    _placed(moved, device, torch.float32)
    assert _same(moved.to("cpu"), s)
    wide = s.to(dtype=torch.float64)
    _placed(wide, torch.device("cpu"), torch.float64)
    assert _same(wide.to(dtype=torch.float32), s)  # float32 -> float64 -> float32 is exact
    assert all(torch.equal(before[k], v) for k, v in s.params_flat.items())  # the input state is unchanged
    assert moved.slots is s.slots  # the lifecycle record stays on the CPU
    # the moved state trains where it lives, and agrees with the CPU to float rounding
    a, _ = ef.train_step(moved, x.to(device), y.to(device))
    b, _ = ef.train_step(s, x, y)
    for k, v in b.params_flat.items():
        torch.testing.assert_close(a.params_flat[k].cpu(), v, rtol=1e-4, atol=1e-5)


def test_device_and_dtype_arguments_are_checked():
    host = ef.hosts.preset("mlp-impaired")
    with pytest.raises(ef.ConfigError, match="not a device"):
        ef.init(host, device="gpu0")
    with pytest.raises(ef.ConfigError, match="floating-point"):
        ef.init(host, dtype=torch.int64)
    with pytest.raises(ef.ConfigError, match="floating-point"):
        ef.init(host).to(dtype=torch.int32)
    with pytest.raises(ef.ConfigError, match="floating-point"):
        _task().to(dtype=torch.int64)
    with pytest.raises(ef.ConfigError, match="device"):
        load_config(device="gpu0")
    if not torch.cuda.is_available():
        for call in (lambda: ef.init(host, device="cuda"), lambda: ef.init(host).to("cuda"),
                     lambda: tasks.load("spirals", device="cuda"), lambda: _task().to("cuda")):
            with pytest.raises(ef.CapabilityError, match="no usable CUDA device"):
                call()


def test_a_meta_host_germinates_meta_seeds():
    """Shapes without memory: a host on the meta device gets every seed on the meta device."""
    for name in ("mlp-impaired", "cnn-impaired", "transformer-small"):
        s = ef.init(ef.hosts.preset(name), device="meta")
        for slot, offered in ((n, a["blueprints"]) for n, a in ef.legal_actions(s).items()):
            if offered:
                s = ef.advance(ef.germinate(s, slot, offered[0]), slot)
        assert any(s.blueprints)
        _placed(s, torch.device("meta"), torch.float32)
        x = torch.empty(4, *s.host.input_shapes[0], device="meta")
        assert ef.apply(s, x).shape == (4, 10) and ef.apply(s, x).device.type == "meta"
        net = ef.export(s)  # the exported module too: shapes, no memory
        assert {t.device.type for t in [*net.parameters(), *net.buffers()]} == {"meta"} and net(x).shape == (4, 10)


def test_wrap_keeps_the_modules_device_and_a_generator_draws_the_same_weights_everywhere(device):
    torch.manual_seed(0)  # the module's own init; esper_fn never touches the global RNG
    net = nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 10)).to(device)
    x = torch.randn(8, 40, device=device)
    host = ef.wrap(net, x, slots=[nn.Linear])
    s = ef.init(host)
    assert s.device.type == device.type
    assert torch.equal(ef.apply(s, x), net(x).detach())
    drawn = ef.init(host, generator=torch.Generator().manual_seed(3))
    cpu = ef.init(ef.wrap(net.cpu(), x.cpu(), slots=[nn.Linear]), generator=torch.Generator().manual_seed(3))
    assert drawn.device.type == device.type and _same(drawn.to("cpu"), cpu)


# --- tasks ------------------------------------------------------------------------------------------


def test_tasks_load_onto_a_device_and_batch_there(device):
    cpu = tasks.load("spirals", seed=1)
    task = tasks.load("spirals", seed=1, device=device)
    assert task.device.type == device.type and cpu.device.type == "cpu"
    for split in ("train", "val", "test"):
        for a, b in zip(task.split(split), cpu.split(split)):
            assert a.device.type == device.type and torch.equal(a.cpu(), b)
    got = list(task.batches("train", 64, generator=torch.Generator().manual_seed(5)))
    want = list(cpu.batches("train", 64, generator=torch.Generator().manual_seed(5)))
    assert len(got) == len(want)
    for (xa, ya), (xb, yb) in zip(got, want):  # the same order on every device (drawn on the CPU generator)
        assert xa.device.type == device.type and torch.equal(xa.cpu(), xb) and torch.equal(ya.cpu(), yb)
    wide = task.to(dtype=torch.float64)
    assert wide.dtype == torch.float64 and wide.y_train.dtype == torch.int64 and task.dtype == torch.float32


def test_a_task_refuses_splits_on_different_devices_or_dtypes():
    t = _task()
    from dataclasses import replace

    with pytest.raises(ef.TaskError, match="share one dtype and device"):
        replace(t, x_val=t.x_val.double())
    with pytest.raises(ef.TaskError, match="floating-point"):
        replace(t, x_train=t.x_train.long(), x_val=t.x_val.long(), x_test=t.x_test.long())


# --- training in float64 and bfloat16 ---------------------------------------------------------------


def _grow_two_epochs(task: tasks.Task, device, dtype) -> tuple[ef.State, list[dict], list[dict]]:
    """A TRAINING (shadow) epoch, then a BLENDING one, with telemetry after each."""
    host = ef.hosts.preset("mlp-impaired", input_shape=task.input_shape, n_classes=task.n_classes)
    g = torch.Generator().manual_seed(0)
    s = ef.init(host, generator=g, device=device, dtype=dtype)
    s = ef.advance(ef.germinate(s, "input", "conv1d_k5", generator=g, tempo=2), "input")
    s = ef.advance(ef.germinate(s, "fc1", "lora_r4", generator=g, tempo=2), "fc1")
    t = task.to(device, dtype=dtype)
    metrics, tels = [], []
    for epoch in range(2):
        s, m = train_epoch(s, t, BATCH, generator=g)
        metrics.append(m)
        tels.append(telemetry(s, t, m))
        if epoch == 0:
            s = ef.tick(ef.advance(ef.advance(s, "input"), "fc1"))
    return s, metrics, tels


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_float64_and_bfloat16_hosts_train_measure_and_export(device, dtype):
    task = _task()
    s, metrics, tels = _grow_two_epochs(task, device, dtype)
    ref, ref_metrics, ref_tels = _grow_two_epochs(task, torch.device("cpu"), torch.float32)
    _placed(s, device, dtype)
    tol = 1e-4 if dtype == torch.float64 else 0.1  # the same computation, in another precision
    for m, r in zip(metrics, ref_metrics):
        assert m.keys() == r.keys() and all(math.isfinite(v) for v in m.values())
        assert abs(m["train_loss"] - r["train_loss"]) <= tol * max(1.0, r["train_loss"]), (m, r)
    for tel, r in zip(tels, ref_tels):
        assert tel.keys() == r.keys()
        assert abs(tel["val_loss"] - r["val_loss"]) <= tol * max(1.0, r["val_loss"])
    assert "input/contribution" in tels[1] and "fc1/contribution" in tels[1]
    x = task.x_val.to(device, dtype)
    net = ef.export(s)
    assert {p.dtype for p in net.parameters()} == {dtype} and {p.device.type for p in net.parameters()} == {device.type}
    assert torch.equal(net(x), ef.apply(s, x))
    with pytest.raises(ef.HostError, match="convert the batch"):
        ef.train_step(s, task.x_val.to(device), task.y_val.to(device))  # float32 into a cast state


def test_stacked_hosts_train_on_a_device_in_float64(device):
    task = _task().to(device, dtype=torch.float64)
    host = ef.hosts.preset("mlp-impaired")
    states = [ef.init(host, generator=torch.Generator().manual_seed(i), device=device, dtype=torch.float64)
              for i in range(4)]
    states = [ef.advance(ef.germinate(s, "fc1", "mlp_gelu", generator=torch.Generator().manual_seed(9)), "fc1")
              for s in states]
    states[3] = ef.tick(ef.advance(states[3], "fc1"))  # one host blends while the others incubate
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4)]  # noqa: E731
    stacked = train_epochs(states, task, BATCH, generators=gens())
    one_by_one = [train_epoch(s, task, BATCH, generator=g) for s, g in zip(states, gens())]
    for (a, ma), (b, mb) in zip(stacked, one_by_one):
        _placed(a, device, torch.float64)
        assert ma.keys() == mb.keys()
        for k, v in b.params_flat.items():
            torch.testing.assert_close(a.params_flat[k], v, rtol=1e-9, atol=1e-10)
    back = ef.unstack(ef.stack([s for s, _ in stacked]))
    assert all(_same(a, b) for a, (b, _) in zip(back, stacked))


def test_lifecycle_ops_run_on_the_states_device(device):
    """Merging folds (LoRA; width growth with its moments), prunes and ticks, single and stacked."""
    x, y = torch.randn(16, 40), torch.randint(0, 10, (16,))

    def grown(where, bid):
        s = ef.init(ef.hosts.preset("mlp-impaired"), generator=torch.Generator().manual_seed(0), device=where)
        s = ef.germinate(s, "fc1", bid, generator=torch.Generator().manual_seed(1), tempo=2)
        s = ef.tick(ef.advance(ef.advance(s, "fc1"), "fc1"))
        s, _ = ef.train_step(s, x.to(where), y.to(where))
        return ef.advance(s, "fc1", force=True)

    for bid in ("lora_r4", "width_k4"):
        cpu, there = grown("cpu", bid), grown(device, bid)
        folded = ef.fossilize(there, "fc1", force=True)
        _placed(folded, device, torch.float32)
        torch.testing.assert_close(ef.apply(folded, x.to(device)).cpu(), ef.apply(ef.fossilize(cpu, "fc1", force=True), x),
                                   rtol=1e-5, atol=1e-5)
        stacked = ef.fossilize(ef.stack([there, there]), "fc1", force=True)  # the vmapped merge
        _placed(stacked, device, torch.float32)
        assert _same(ef.unstack(stacked)[0], folded)
        pruned = ef.tick(ef.prune(there, "fc1"))
        assert pruned.stage("fc1") == ef.Stage.EMBARGOED and not pruned.seed_params("fc1")


# --- checkpoints and runs ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_checkpoints_save_from_any_device_and_restore_onto_a_chosen_one(device, dtype, tmp_path):
    host = ef.hosts.preset("mlp-impaired")
    s = ef.init(host, generator=torch.Generator().manual_seed(0), device=device, dtype=dtype)
    s = ef.advance(ef.germinate(s, "fc1", "lora_r4", generator=torch.Generator().manual_seed(1)), "fc1")
    s, _ = ef.train_step(s, torch.randn(8, 40, device=device, dtype=dtype), torch.randint(0, 10, (8,), device=device))
    mgr = CheckpointManager(tmp_path / "ckpt")
    mgr.save(3, s, {"epoch": 3})
    on_cpu, meta = mgr.restore_state(host, 3)
    assert meta == {"epoch": 3} and on_cpu.device.type == "cpu" and _same(on_cpu, s)
    there, _ = mgr.restore_state(host, 3, device=device)
    _placed(there, device, dtype)
    assert _same(there, s)
    assert mgr.restore_state(host, device="meta")[0].device.type == "meta"


def test_a_float32_checkpoint_keeps_its_metadata():
    """Only a cast state records its dtype: float32 checkpoints are what they were."""
    s = ef.init(ef.hosts.preset("mlp-impaired"))
    assert "dtype" not in ef.state_to_tensors(s)[1]
    assert ef.state_to_tensors(s.to(dtype=torch.float64))[1]["dtype"] == "float64"


def test_a_float64_module_cast_to_float32_restores(tmp_path):
    """The dtype recorded is the state's when it differs from its host's own (here a float64 module)."""
    net = nn.Sequential(nn.Linear(40, 8), nn.ReLU(), nn.Linear(8, 10)).double()
    host = ef.wrap(net, torch.randn(2, 40, dtype=torch.float64), slots=[nn.Linear])
    mgr = CheckpointManager(tmp_path / "ckpt")
    for step, s in enumerate((ef.init(host), ef.init(host, dtype=torch.float32))):
        s = ef.germinate(s, "0", "lora_r4")
        assert ("dtype" in ef.state_to_tensors(s)[1]) == (s.dtype == torch.float32)
        mgr.save(step, s)
        back, _ = mgr.restore_state(host, step)
        assert back.dtype == s.dtype and _same(back, s)


def test_grow_runs_on_the_configured_device(device, tmp_path):
    base = dict(task="spirals", host="mlp-w8", controller="schedule", schedule_every=1, epochs=3, seed=0,
                checkpoint_every=2)
    s = grow(RunConfig(**base, device=str(device)), tmp_path / "run", progress=False)
    assert s.epochs == 3 and math.isfinite(s.test_loss)
    if device.type == "cpu":  # the default device gives the very same run
        ref = grow(RunConfig(**base), tmp_path / "ref", progress=False)
        assert (s.test_accuracy, s.test_loss, s.params_after) == (ref.test_accuracy, ref.test_loss, ref.params_after)
    resumed = grow(RunConfig(**base, device=str(device)), tmp_path / "run", resume=True, progress=False)
    assert resumed.epochs == 3


# --- CUDA: no synchronisation per batch -------------------------------------------------------------


def _cuda_only(device: torch.device) -> None:
    if device.type != "cuda":
        pytest.skip("host-device synchronisation exists only on CUDA (torch.cuda.set_sync_debug_mode)")


def _incubating_and_blending(device, n_hosts: int = 1):
    host = ef.hosts.preset("mlp-impaired")
    states = []
    for i in range(n_hosts):
        g = torch.Generator().manual_seed(i)
        s = ef.init(host, generator=g, device=device)
        s = ef.advance(ef.germinate(s, "input", "conv1d_k5", generator=g, tempo=3), "input")  # TRAINING: shadow
        s = ef.tick(ef.advance(ef.advance(ef.germinate(s, "fc1", "lora_r4", generator=g, tempo=3), "fc1"), "fc1"))
        states.append(s)  # fc1 BLENDING at alpha 1/3: live
    return states


def test_train_steps_do_not_synchronise_per_batch(device):
    _cuda_only(device)
    task = tasks.load("mnist1d", device=device)
    (s,) = _incubating_and_blending(device)
    batches = list(task.batches("train", 100, generator=torch.Generator().manual_seed(0)))
    s, _ = ef.train_step(s, *batches[0], grad_stats=True, with_output=True)  # warm-up: constants, slot view
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for xb, yb in batches[1:]:
            s, m = ef.train_step(s, xb, yb, grad_stats=True, with_output=True, donate=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert math.isfinite(float(m["loss"]))


def test_stacked_train_steps_do_not_synchronise_per_batch(device):
    _cuda_only(device)
    task = tasks.load("mnist1d", device=device)
    states = _incubating_and_blending(device, 4)
    states[0] = ef.advance(states[0], "fc1", force=True)  # hosts in different stages at one slot
    s = ef.stack(states)
    x, y = task.split("train")
    xb, yb = x[:400].reshape(4, 100, -1), y[:400].reshape(4, 100)
    s, _ = ef.train_step(s, xb, yb)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            s, m = ef.train_step(s, xb, yb, grad_stats=True, donate=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert m["loss"].shape == (4,)


def _syncs(fn) -> int:
    """How many host-device synchronisations `fn()` makes (sync debug mode "warn" warns on each)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def test_an_epoch_synchronises_a_fixed_number_of_times_whatever_its_batch_count(device):
    """train_epoch and telemetry read numbers once per epoch: 10 or 30 batches, the same count."""
    _cuda_only(device)
    task = tasks.load("mnist1d", device=device)
    (s,) = _incubating_and_blending(device)
    train_epoch(s, task, TrainConfig(batch_size=300), generator=torch.Generator().manual_seed(0))  # warm-up
    counts = {}
    for bs in (300, 100):  # 10 and 30 batches of the 3000 training samples
        def epoch(bs=bs):
            st, m = train_epoch(s, task, TrainConfig(batch_size=bs), generator=torch.Generator().manual_seed(0))
            telemetry(st, task, m)

        counts[bs] = _syncs(epoch)
    assert counts[100] == counts[300], counts


def test_a_flash_attention_seed_trains_in_a_cuda_state(device):
    """The capability-gated design runs its real kernel inside a state on the GPU (sm80+)."""
    _cuda_only(device)
    if "flash_attention" not in ef.blueprints.available_capabilities():
        if os.environ.get("ESPER_FN_REQUIRE_CUDA") == "1":  # make test-gpu: the real path must run, never skip
            pytest.fail("make test-gpu needs the FlashAttention kernel (an sm80+ GPU) to run the capability-gated "
                        f"blueprint's real path; this GPU is {torch.cuda.get_device_name()}.")
        pytest.skip("the FlashAttention kernel needs an sm80+ GPU")
    s = ef.init(ef.hosts.transformer(seq_len=8, d_model=32, n_heads=4, n_layers=1),
                generator=torch.Generator().manual_seed(0), device=device)
    s = ef.germinate(s, "input", "flash_attention", generator=torch.Generator().manual_seed(1), tempo=1)
    assert s.blueprints[s.index("input")] == "flash_attention@2.0.0"
    s = ef.tick(ef.advance(ef.advance(s, "input"), "input"))
    x, y = torch.randn(16, 8, device=device), torch.randint(0, 10, (16,), device=device)
    for _ in range(3):
        s, m = ef.train_step(s, x, y)
    assert math.isfinite(float(m["loss"]))
    assert float(s.seed_params("input")["w_o"].abs().max()) > 0  # the zero-born output projection learned


_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def _python_reads(monkeypatch, fn) -> int:
    """How many times `fn()` reads a tensor's value into Python (`.item()`, `.tolist()`, `bool`,
    `float`, `int`): on CUDA each such read waits for the device."""
    count = [0]
    for name in _READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        fn()
    finally:
        monkeypatch.undo()
    return count[0]


def test_an_epoch_reads_numbers_once_whatever_its_batch_count(device, monkeypatch):
    """The device-independent half of the no-sync rule: `train_epoch` and `telemetry` read tensor
    values into Python a fixed number of times per epoch, not per batch (CUDA tests above check the
    syncs themselves)."""
    task = _task(n=600).to(device)
    (s,) = _incubating_and_blending(device)
    train_epoch(s, task, TrainConfig(batch_size=120), generator=torch.Generator().manual_seed(0))  # warm-up
    counts = {}
    for bs in (120, 40):  # 3 and 9 batches of the 360 training samples
        def epoch(bs=bs):
            st, m = train_epoch(s, task, TrainConfig(batch_size=bs), generator=torch.Generator().manual_seed(0))
            telemetry(st, task, m)

        counts[bs] = _python_reads(monkeypatch, epoch)
    assert 0 < counts[40] == counts[120], counts  # (0 would mean the counting itself failed)
    # and a train step alone reads none (once its structure is known)
    x, y = task.split("train")
    s1, _ = ef.train_step(s, x[:40], y[:40])
    assert _python_reads(monkeypatch, lambda: ef.train_step(s1, x[:40], y[:40], grad_stats=True,
                                                            with_output=True)) == 0
