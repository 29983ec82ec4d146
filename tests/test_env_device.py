"""The growth env, Tamiyo's PPO and the RL commands on a device, over the `device` fixture.

`make test` runs them on the CPU with an explicit ``device="cpu"`` (and on CUDA where available);
`make test-gpu` on CUDA only. On the CPU an explicit device must change nothing: every number equals
the default env's bit for bit. On CUDA the episodes agree to float rounding.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDictBase
from torchrl.envs import ActionMask, TransformedEnv
from torchrl.envs.utils import check_env_specs

import esper_fn as ef
from esper_fn import GateConfig
from esper_fn.envs import MorphogenesisEnv
from esper_fn.tasks import load

pytestmark = pytest.mark.device

SMALL = {"train": 200, "val": 100}
BPS = ("conv1d_k5", "mlp_gelu", "lora_r4")


def make(**kw) -> MorphogenesisEnv:
    args = dict(task="mnist1d", host="mlp-impaired", num_envs=2, max_epochs=4, subset=SMALL, blueprints=BPS,
                gates=GateConfig(min_training_epochs=1), seed=3)
    args.update(kw)
    return MorphogenesisEnv(**args)


def masked_random(seed: int):
    """A deterministic masked uniform policy (drawn on a CPU generator, so every device plays the same)."""
    g = torch.Generator().manual_seed(seed)

    def policy(td: TensorDictBase) -> TensorDictBase:
        mask = td["action_mask"].float().cpu()
        td.set("action", torch.multinomial(mask, 1, generator=g).squeeze(-1).to(td.device))
        return td

    return policy


def _devices(td: TensorDictBase) -> set[str]:
    return {v.device.type for v in td.values(include_nested=True, leaves_only=True)}


def test_the_env_trains_on_its_device_and_returns_everything_there(device):
    env = make(device=device)
    assert env.device.type == device.type
    for spec in (env.observation_spec, env.action_spec, env.reward_spec, env.done_spec):
        assert spec.device.type == device.type
    td = env.rollout(4, masked_random(0), break_when_any_done=False)
    assert td.shape == (2, 4)
    assert _devices(td) == {device.type}
    for row in range(env.num_envs):
        state = env.state(row)
        assert {v.device.type for v in state.params_flat.values()} == {device.type}
        assert env.episode(row).task.device.type == device.type
    assert td["next", "done"][:, -1].all()

    ref = make()  # the default (CPU) env, the same seeds and the same policy draws
    expected = ref.rollout(4, masked_random(0), break_when_any_done=False)
    assert torch.equal(td["action"].cpu(), expected["action"])
    got, want = td["next", "metrics", "val_accuracy"].cpu(), expected["next", "metrics", "val_accuracy"]
    if device.type == "cpu":  # an explicit device="cpu" is the default env, bit for bit
        assert torch.equal(got, want)
        assert torch.equal(td["next", "reward"], expected["next", "reward"])
    else:
        assert torch.allclose(got, want, atol=0.02)


def test_the_env_on_a_device_passes_torchrls_spec_check(device):
    check_env_specs(TransformedEnv(make(device=device, num_envs=1, max_epochs=2), ActionMask()), seed=0)


def test_instances_and_given_tasks_move_to_the_envs_device(device):
    from esper_fn.bench import Instance

    inst = Instance(name="moons-a", split="train", task="moons", host="mlp-w2", epochs=2, budget_ratio=4.0,
                    train_subset=100)
    env = MorphogenesisEnv(instances=[inst], num_envs=1, blueprints=BPS, device=device)
    env.reset()
    assert env.episode(0).task.device.type == device.type
    task = load("mnist1d", seed=0)
    env2 = make(contexts=[(task, "mlp-impaired")], task=None, host=None, num_envs=1, device=device)
    env2.reset()
    assert env2.episode(0).task.device.type == device.type
    assert task.device.type == "cpu"  # the caller's task is not moved


def test_a_snapshot_restores_onto_the_envs_device(device):
    env = make(device=device)
    env.rollout(2, masked_random(1), break_when_any_done=False)
    tensors, meta = env.snapshot()
    other = make(device=device)
    obs = other.restore(tensors, meta)
    assert _devices(obs) == {device.type}
    for row in range(2):
        a, b = env.state(row), other.state(row)
        assert all(torch.equal(v, b.params_flat[k]) for k, v in a.params_flat.items())


def test_the_envs_device_argument_is_checked():
    with pytest.raises(ef.ConfigError, match="not a device"):
        make(device="gpu0")
    with pytest.raises(ef.ConfigError, match="meta"):
        make(device="meta")
    with pytest.raises(ef.CapabilityError, match="cuda:99"):  # no machine has 100 GPUs
        make(device="cuda:99")


# --- Tamiyo's PPO and the commands ----------------------------------------------------------------


def test_ppo_trains_tamiyo_on_the_envs_device_and_writes_cpu_files(device, tmp_path):
    from functools import partial

    from esper_fn.checkpoint import CheckpointManager
    from esper_fn.policies import PPOConfig, load_tamiyo, train_ppo
    from esper_fn.policies._tamiyo import tamiyo_tensors

    config = PPOConfig(iterations=2, ppo_epochs=1, minibatch_size=4, checkpoint_every=1,
                       tamiyo={"hidden": 16, "heads": 2})
    env_kw = dict(task="mnist1d", host="mlp-impaired", num_envs=2, max_epochs=2, subset={"train": 100, "val": 100},
                  blueprints=BPS, tempos=(1,), gates=GateConfig(min_training_epochs=1))
    seen = []
    space = MorphogenesisEnv(**env_kw).action_space
    on = train_ppo(partial(MorphogenesisEnv, **env_kw, device=device), config, tmp_path / "on", space,
                   progress=False, tensorboard=False, on_iteration=lambda it, s: seen.append(it))
    assert seen == [1, 2]
    tensors, _ = CheckpointManager(tmp_path / "on" / "checkpoints").restore()
    assert {v.device.type for v in tensors.values()} == {"cpu"}
    assert ("rng/cuda" in tensors) == (device.type == "cuda")
    actor, critic, _ = load_tamiyo(on["weights"])
    ref = train_ppo(partial(MorphogenesisEnv, **env_kw), config, tmp_path / "ref", space, progress=False,
                    tensorboard=False)
    got, want = tamiyo_tensors(actor, critic), tamiyo_tensors(*load_tamiyo(ref["weights"])[:2])
    assert got.keys() == want.keys()
    if device.type == "cpu":  # the explicit device is the default run, bit for bit
        assert all(torch.equal(got[k], want[k]) for k in got)
    else:  # the device's own sampling RNG: other actions, other weights; finite and the same layout
        assert all(torch.isfinite(v).all() for v in got.values())


def test_eval_and_bench_take_a_device(device, tmp_path, monkeypatch):
    from esper_fn.bench import SUITES, Instance, Suite
    from esper_fn.cli import main
    from esper_fn.policies._bench_stats import read_runs
    from esper_fn.policies._eval import read_csv

    rc = main(["eval", "--controllers", "static,tamiyo", "--task", "mnist1d", "--hosts", "mlp-impaired",
               "--epochs", "2", "--seeds", "7-7", "--num-envs", "1", "--subset-train", "100", "--no-progress",
               "--device", str(device), "--out", str(tmp_path / "eval")])
    assert rc == 0
    assert {r.controller for r in read_csv(tmp_path / "eval" / "runs.csv")} == {"static", "tamiyo"}
    tiny = Suite(name="tiny-device", blueprints=("conv1d_k3@1.0.0", "mlp_gelu@1.0.0"), tempos=(2,), num_slots=4,
                 instances=(Instance(name="moons-a", split="train", task="moons", host="mlp-w2", epochs=2,
                                     budget_ratio=4.0, train_subset=100),
                            Instance(name="spirals-b", split="test", task="spirals", host="mlp-w3", epochs=2,
                                     budget_ratio=5.0, train_subset=100),))
    monkeypatch.setitem(SUITES, tiny.name, tiny)
    assert main(["bench", "run", "--suite", tiny.name, "--controllers", "static,random", "--seeds", "10-10",
                 "--train-seeds", "0-0", "--device", str(device), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    rows = read_runs(tmp_path / "b" / "runs.csv")
    assert {(r.controller, r.seed) for r in rows if r.split == "test"} == {("static", 10), ("random", 10)}


def test_a_device_this_machine_lacks_is_a_one_line_error(tmp_path, capsys):
    from esper_fn.cli import main

    for argv in (["eval", "--controllers", "static", "--epochs", "1", "--seeds", "7-7", "--num-envs", "1",
                  "--device", "cuda:99", "--no-progress", "--out", str(tmp_path / "e")],
                 ["train-tamiyo", "--iterations", "1", "--epochs", "1", "--num-envs", "1", "--device", "cuda:99",
                  "--no-progress", "--out", str(tmp_path / "t")],
                 ["eval", "--controllers", "static", "--epochs", "1", "--seeds", "7-7", "--device", "abacus",
                  "--no-progress", "--out", str(tmp_path / "e2")]):
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc in (1, 2) and len(err) == 1 and err[0].startswith("esper-fn"), (argv, err)
        assert "Traceback" not in err[0]
    assert not (tmp_path / "t").exists()


def test_a_sculpt_through_the_env_runs_on_its_device(device):
    from esper_fn.actions import SCULPT_OP

    env = make(device=device, sculpt=True, num_envs=1, max_epochs=3)
    sp = env.action_space
    td = env.reset()
    before = env.state(0).num_params()
    action = sp.encode(SCULPT_OP, env.state(0).slot_names.index("fc1"))  # a host layer: offered from the start
    assert bool(td["action_mask"][0, action].cpu())
    out = env.step(td.set("action", torch.tensor([action], device=td.device)))["next"]
    state = env.state(0)
    assert state.num_params() < before and env.episode(0).counts.sculpted == 1
    assert _devices(out) == {device.type}
    assert {v.device.type for v in state.params_flat.values()} == {device.type}
