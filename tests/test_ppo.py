"""PPO wiring: a smoke run on a tiny env, logged diagnostics, bit-identical resume, offline buffer, warm start
(`init`) and its checks."""

from __future__ import annotations

import json
import shutil
from functools import partial

import pytest
import torch

from esper_fn import ConfigError, GateConfig
from esper_fn.checkpoint import CheckpointManager
from esper_fn.envs import MorphogenesisEnv
from esper_fn.policies import PPOConfig, TamiyoError, _ppo, load_tamiyo, train_ppo
from esper_fn.policies._tamiyo import tamiyo_tensors

BPS = ("conv1d_k5", "mlp_gelu", "ia3")
make_env = partial(MorphogenesisEnv, task="mnist1d", host="mlp-impaired", num_envs=2, max_epochs=3,
                   subset={"train": 100, "val": 100}, blueprints=BPS, tempos=(1,), gates=GateConfig(min_training_epochs=1))


def layout():
    return make_env().action_space


CONFIG = dict(iterations=3, ppo_epochs=2, minibatch_size=4, checkpoint_every=1, tamiyo={"hidden": 16, "heads": 2})


def test_ppo_smoke_run_logs_diagnostics_and_writes_weights(tmp_path):
    lay = layout()
    summary = train_ppo(make_env, PPOConfig(**CONFIG), tmp_path, lay, progress=False)
    assert summary["frames"] == 3 * 2 * 3
    last = summary["last"]
    for k in ("explained_variance", "entropy", "approx_kl", "clip_fraction", "ops/germinate", "fossilize_rate",
              "final_val_accuracy", "loss/safety"):
        assert k in last
    assert last["entropy"] > 0
    scalars = tmp_path / "logs" / "ppo" / "scalars"
    assert (scalars / "entropy.csv").read_text().count("\n") == 3
    hist = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in hist] == [1, 2, 3]
    png = tmp_path / "training.png"  # the curves of this run, written at the end
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    actor, critic, meta = load_tamiyo(summary["weights"])
    assert meta["iterations"] == 3


def test_resume_is_bit_identical(tmp_path):
    lay = layout()
    full = train_ppo(make_env, PPOConfig(**CONFIG), tmp_path / "a", lay, progress=False, tensorboard=False)
    part = PPOConfig(**{**CONFIG, "iterations": 3})
    # Interrupt after 2 iterations (an exception from the callback), then resume.
    class Stop(Exception):
        pass

    def stop(it, _):
        if it == 2:
            raise Stop

    try:
        train_ppo(make_env, part, tmp_path / "b", lay, progress=False, tensorboard=False, on_iteration=stop)
    except Stop:
        pass
    resumed = train_ppo(make_env, part, tmp_path / "b", lay, progress=False, tensorboard=False, resume=True)
    ta = tamiyo_tensors(*load_tamiyo(full["weights"])[:2])
    tb = tamiyo_tensors(*load_tamiyo(resumed["weights"])[:2])
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    ha = (tmp_path / "a" / "history.jsonl").read_text().splitlines()[-1]
    hb = (tmp_path / "b" / "history.jsonl").read_text().splitlines()[-1]
    strip = lambda h: {k: v for k, v in json.loads(h).items() if not k.startswith("seconds")}  # noqa: E731
    assert strip(ha) == strip(hb)


@pytest.mark.slow
def test_example_script_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "train_tamiyo_ppo.py"
    res = subprocess.run([sys.executable, str(script), "--iterations", "1", "--num-envs", "2", "--epochs", "2",
                          "--subset-train", "100", "--blueprints", "conv1d_k5,mlp_gelu", "--minibatch-size", "2",
                          "--ppo-epochs", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "it   1" in res.stdout and (tmp_path / "tamiyo.safetensors").is_file()
    assert "row 1: val acc" in res.stdout


# --- warm start (`init`, `esper-fn train-tamiyo --init`) ---------------------------------------------------------

WARM = {**CONFIG, "iterations": 2, "seed": 1}  # another seed: a cold start would build other weights


@pytest.fixture(scope="module")
def donor(tmp_path_factory):
    """A previous tiny run (one PPO iteration, seed 0): its output directory (weights + checkpoint)."""
    out = tmp_path_factory.mktemp("donor")
    train_ppo(make_env, PPOConfig(**{**CONFIG, "iterations": 1}), out, layout(), progress=False, tensorboard=False)
    return out


class _Started(Exception):
    pass


def _starting_state(monkeypatch, out, config=WARM, **kw):
    """The weights (and optimizer) train_ppo hands to its training loop, before any collection or update."""
    seen = {}

    def loop(run):
        seen["tensors"] = tamiyo_tensors(run.actor, run.critic)
        seen["optimizer_state"] = dict(run.opt.state)
        run.collector.shutdown()
        raise _Started

    monkeypatch.setattr(_ppo, "_loop", loop)
    with pytest.raises(_Started):
        train_ppo(make_env, PPOConfig(**config), out, layout(), progress=False, tensorboard=False, **kw)
    return seen


@pytest.mark.parametrize("resume", [False, True])  # resume with no checkpoint yet: starts from init too
def test_init_starts_from_exactly_the_given_weights(tmp_path, donor, monkeypatch, resume):
    wanted = tamiyo_tensors(*load_tamiyo(donor / "tamiyo.safetensors")[:2])
    warm = _starting_state(monkeypatch, tmp_path / "warm", init=donor / "tamiyo.safetensors", resume=resume)
    cold = _starting_state(monkeypatch, tmp_path / "cold", resume=resume)
    assert warm["tensors"].keys() == wanted.keys() == cold["tensors"].keys()
    for k in wanted:
        assert torch.equal(warm["tensors"][k], wanted[k]), k
    # the check can fail: without init this run starts elsewhere
    assert any(not torch.equal(cold["tensors"][k], wanted[k]) for k in wanted)
    assert warm["optimizer_state"] == {}  # weights only: Adam starts fresh


def test_warm_started_run_trains_and_records_init(tmp_path, donor):
    w = donor / "tamiyo.safetensors"
    summary = train_ppo(make_env, PPOConfig(**WARM), tmp_path, layout(), progress=False, tensorboard=False, init=w)
    assert summary["iterations"] == 2 and (tmp_path / "tamiyo.safetensors").is_file()
    meta = CheckpointManager(tmp_path / "checkpoints").restore()[1]
    assert meta["init"]["path"] == str(w)
    assert len(meta["init"]["sha256"]) == 64


def test_init_with_another_hidden_size_raises(tmp_path, donor):
    bigger = {**WARM, "tamiyo": {**CONFIG["tamiyo"], "hidden": 32}}
    with pytest.raises(TamiyoError, match=r"hidden: file 16, this run 32.*`tamiyo:` in the --config"):
        train_ppo(make_env, PPOConfig(**bigger), tmp_path, layout(), progress=False, tensorboard=False,
                  init=donor / "tamiyo.safetensors")
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


@pytest.mark.parametrize("env_kw, field", [({"blueprints": BPS[:2]}, "blueprints"), ({"tempos": (1, 2)}, "tempos")])
def test_init_with_another_action_layout_raises(tmp_path, donor, env_kw, field):
    other = partial(make_env, **env_kw)
    lay = other().action_space
    with pytest.raises(TamiyoError, match=rf"{field}: file .*this run .*same --blueprints, --tempos"):
        train_ppo(other, PPOConfig(**WARM), tmp_path, lay, progress=False, tensorboard=False,
                  init=donor / "tamiyo.safetensors")


def test_init_with_a_file_that_is_not_tamiyo_weights_raises(tmp_path, donor):
    ckpt = next((donor / "checkpoints").rglob("*.safetensors"))  # a PPO checkpoint, not a save_tamiyo file
    with pytest.raises(TamiyoError, match="not a Tamiyo weights file"):
        train_ppo(make_env, PPOConfig(**WARM), tmp_path / "a", layout(), progress=False, tensorboard=False, init=ckpt)
    with pytest.raises(FileNotFoundError, match="no Tamiyo weights"):
        train_ppo(make_env, PPOConfig(**WARM), tmp_path / "b", layout(), progress=False, tensorboard=False,
                  init=tmp_path / "missing.safetensors")


def test_resume_of_a_warm_started_run_is_bit_identical(tmp_path, donor):
    w = donor / "tamiyo.safetensors"
    full = train_ppo(make_env, PPOConfig(**WARM), tmp_path / "a", layout(), progress=False, tensorboard=False, init=w)

    def stop(it, _):  # called before that iteration's checkpoint: the run stops with the checkpoint of iteration 1
        if it == 2:
            raise _Started

    with pytest.raises(_Started):
        train_ppo(make_env, PPOConfig(**WARM), tmp_path / "b", layout(), progress=False, tensorboard=False, init=w,
                  on_iteration=stop)
    assert CheckpointManager(tmp_path / "b" / "checkpoints").latest_step() == 1
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    ta = tamiyo_tensors(*load_tamiyo(full["weights"])[:2])
    # the same command again (with --init) and without --init: both continue from the checkpoint
    for run, init in ((tmp_path / "b", w), (tmp_path / "c", None)):
        resumed = train_ppo(make_env, PPOConfig(**WARM), run, layout(), progress=False, tensorboard=False,
                            resume=True, init=init)
        tb = tamiyo_tensors(*load_tamiyo(resumed["weights"])[:2])
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (init, k)


def test_resume_with_a_different_init_is_a_config_error(tmp_path, donor):
    # a cold run (the donor: checkpointed without init) resumed with --init
    shutil.copytree(donor, tmp_path / "cold")
    with pytest.raises(ConfigError, match="started without --init.*drop --init"):
        train_ppo(make_env, PPOConfig(**{**CONFIG, "iterations": 1}), tmp_path / "cold", layout(), progress=False,
                  tensorboard=False, resume=True, init=donor / "tamiyo.safetensors")
    # a warm-started run resumed with another weights file
    w = donor / "tamiyo.safetensors"
    train_ppo(make_env, PPOConfig(**{**WARM, "iterations": 1}), tmp_path / "warm", layout(), progress=False,
              tensorboard=False, init=w)
    other = tmp_path / "warm" / "tamiyo.safetensors"  # its own output: same architecture, other weights
    with pytest.raises(ConfigError, match=rf"started from --init {w}"):
        train_ppo(make_env, PPOConfig(**{**WARM, "iterations": 1}), tmp_path / "warm", layout(), progress=False,
                  tensorboard=False, resume=True, init=other)


def test_a_checkpoint_exports_as_the_weights_of_that_iteration(tmp_path, capsys):
    from esper_fn.cli import main
    from esper_fn.policies import tamiyo_from_checkpoint

    out = tmp_path / "run"
    summary = train_ppo(make_env, PPOConfig(**CONFIG), out, layout(), progress=False, tensorboard=False)
    final = tamiyo_tensors(*load_tamiyo(summary["weights"])[:2])
    last = tamiyo_from_checkpoint(out)  # the latest checkpoint is the last iteration: the final weights
    assert last.name == "tamiyo_it3.safetensors"
    got = tamiyo_tensors(*load_tamiyo(last)[:2])
    assert got.keys() == final.keys() and all(torch.equal(got[k], final[k]) for k in got)
    actor, critic, meta = load_tamiyo(tamiyo_from_checkpoint(out, 2, tmp_path / "it2.safetensors"))
    assert meta["iterations"] == 2 and meta["from_checkpoint"] == str(out)
    earlier = tamiyo_tensors(actor, critic)
    assert any(not torch.equal(earlier[k], final[k]) for k in final)  # an earlier policy, not the final one
    assert main(["tamiyo-export", str(out), "--step", "2", "--out", str(tmp_path / "cli.safetensors")]) == 0
    assert "tamiyo:" in capsys.readouterr().out
    cli = tamiyo_tensors(*load_tamiyo(tmp_path / "cli.safetensors")[:2])
    assert all(torch.equal(cli[k], earlier[k]) for k in cli)
    other = CheckpointManager(tmp_path / "other" / "checkpoints")
    other.save(1, {"x": torch.zeros(2)}, {"iteration": 1})
    with pytest.raises(TamiyoError, match="not a Tamiyo training checkpoint"):
        tamiyo_from_checkpoint(tmp_path / "other")
    # what the user asked for is wrong: one line, exit 2, nothing written
    for argv, why in (([str(out), "--step", "9"], "checkpoints at iterations [2, 3], not 9"),
                      ([str(tmp_path / "nowhere")], "no such directory"),
                      ([str(tmp_path)], "holds no training checkpoints"),
                      ([str(tmp_path / "other")], "not a Tamiyo training checkpoint")):
        assert main(["tamiyo-export", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("esper-fn") and "\n" not in err and why in err
    assert not (tmp_path / "other" / "tamiyo_it1.safetensors").exists()
