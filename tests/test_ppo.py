"""PPO wiring: a smoke run on a tiny env, logged diagnostics, bit-identical resume, offline buffer."""

from __future__ import annotations

import json
from functools import partial

import torch

from esper_fn import GateConfig
from esper_fn.envs import GLOBAL_FEATURES, SLOT_FEATURES, MorphogenesisEnv
from esper_fn.policies import Layout, PPOConfig, load_tamiyo, train_ppo
from esper_fn.policies._tamiyo import tamiyo_tensors

BPS = ("conv1d_k5", "mlp_gelu", "ia3")
make_env = partial(MorphogenesisEnv, task="mnist1d", host="mlp-impaired", num_envs=2, max_epochs=3,
                   subset={"train": 100, "val": 100}, blueprints=BPS, tempos=(1,), gates=GateConfig(min_training_epochs=1))


def layout() -> Layout:
    return Layout.of(make_env(), SLOT_FEATURES, GLOBAL_FEATURES)


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
