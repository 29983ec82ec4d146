"""The env and the runner drive one growth step (`esper_fn.episode.step`): the core's plateau
heuristic run as a TorchRL policy through MorphogenesisEnv takes the same decisions and reaches the
same accuracy as `esper_fn.run.grow` (`esper-fn grow --controller heuristic`) on the same seed,
also through a forced divergence that the governor rolls back."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from esper_fn.controllers import Plateau, PlateauConfig
from esper_fn.envs import MorphogenesisEnv
from esper_fn.events import Advanced, Fossilized, Germinated, Pruned, Rollback, read_events
from esper_fn.policies import ControllerPolicy
from esper_fn.run import RunConfig, grow, param_budget
from esper_fn.tasks import load
from esper_fn.training import evaluate

EPOCHS = 18
SEED = 3
# Grows early (one epoch of < 2 points gain is a plateau) and lets the seed finish within the budget.
PLATEAU = PlateauConfig(patience=1, min_delta=0.02, grow_until=1.0, max_seeds=1, incubate_epochs=2, tempo=3,
                        hold_epochs=2)
NAN_EPOCH = 5  # the seed is incubating then: the rollback prunes it


def _run(tmp_path_factory, inject):
    out = tmp_path_factory.mktemp("grow")
    config = RunConfig(task="mnist1d", host="mlp-impaired", controller="heuristic", epochs=EPOCHS, seed=SEED,
                       plateau=PLATEAU, checkpoint_every=EPOCHS)
    summary = grow(config, out, progress=False, on_epoch_start=inject)
    events = list(read_events(out / "events.jsonl"))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return config, summary, events, metrics


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    return _run(tmp_path_factory, None)


def _decisions(events, with_advance: bool) -> list[tuple[int, str]]:
    out = []
    for e in events:
        if isinstance(e, Germinated):
            out.append((e.epoch, f"GERMINATE {e.blueprint} at {e.slot} (tempo {PLATEAU.tempo})"))
        elif isinstance(e, Fossilized):
            out.append((e.epoch, f"FOSSILIZE {e.slot}"))
        elif isinstance(e, Pruned):
            out.append((e.epoch, f"PRUNE {e.slot}"))
        elif isinstance(e, Advanced) and with_advance:
            out.append((e.epoch, f"ADVANCE {e.slot}"))
    return sorted(out)


def _env_run(config, lifecycle, inject=None):
    task = load(config.task, seed=config.seed)  # grow's task: the seed chooses the validation split
    env = MorphogenesisEnv(contexts=[(task, config.host)], num_envs=1, max_epochs=config.epochs, seed=config.seed,
                           lifecycle=lifecycle, gates=Plateau(PLATEAU).gates, lr=config.lr, train=config.train,
                           governor=config.governor, max_param_ratio=param_budget(config, 826) / 826)
    env.rules = replace(env.rules, inject=inject)
    policy = ControllerPolicy(Plateau(PLATEAU), env.action_space)
    td = env.rollout(config.epochs, policy)
    decisions = []
    for t, a in enumerate(td["action"][0].tolist()):
        if a:
            desc = env.action_space.describe(a, env.state(0).slot_names)
            decisions.append((t, desc))
    return env, td, task, decisions


@pytest.mark.parametrize("lifecycle", ["auto", "full"])
def test_plateau_through_the_env_matches_grow(grown, lifecycle):
    config, summary, events, metrics = grown
    expected = _decisions(events, with_advance=False)
    assert any(d.startswith("GERMINATE") for _, d in expected), "the run never grew: the check would be vacuous"
    assert any(d.startswith(("FOSSILIZE", "PRUNE")) for _, d in expected), "the seed never reached its verdict"

    env, td, task, decisions = _env_run(config, lifecycle)
    if lifecycle == "full":  # the policy issues the advances grow's automatic lifecycle made
        expected = _decisions(events, with_advance=True)
    assert sorted(decisions) == expected
    assert td["next", "metrics", "val_accuracy"][0].tolist() == pytest.approx(
        [m["val_accuracy"] for m in metrics], abs=1e-6)
    assert td["next", "metrics", "params"][0, -1].item() == summary.params_after
    test = evaluate(env.state(0), task.x_test, task.y_test)
    assert test["accuracy"] == pytest.approx(summary.test_accuracy, abs=1e-6)
    assert td["next", "done"][0, -1].item()


def test_a_rollback_goes_the_same_way_in_grow_and_in_the_env(tmp_path_factory, nan_at, grown):
    config, _, clean_events, _ = grown
    germ = next(e.epoch for e in clean_events if isinstance(e, Germinated))
    assert germ < NAN_EPOCH < germ + PLATEAU.incubate_epochs + 1, "the NaN must hit while the seed incubates"
    config, summary, events, metrics = _run(tmp_path_factory, nan_at(NAN_EPOCH))
    (rb,) = [e for e in events if isinstance(e, Rollback)]
    assert rb.epoch == NAN_EPOCH + 1 and rb.pruned == ["input"] and summary.rollbacks == 1

    env, td, task, decisions = _env_run(config, "auto", nan_at(NAN_EPOCH))
    assert sorted(decisions) == _decisions(events, with_advance=False)
    rolled = [m.get("rolled_back", 0.0) for m in metrics]
    assert td["next", "metrics", "rollbacks"][0].tolist() == [float(sum(rolled[: t + 1])) for t in range(EPOCHS)]
    good = [t for t, m in enumerate(metrics) if not m.get("rolled_back")]
    assert [td["next", "metrics", "val_accuracy"][0, t].item() for t in good] == pytest.approx(
        [metrics[t]["val_accuracy"] for t in good], abs=1e-6)
    assert evaluate(env.state(0), task.x_test, task.y_test)["accuracy"] == pytest.approx(summary.test_accuracy,
                                                                                         abs=1e-6)
