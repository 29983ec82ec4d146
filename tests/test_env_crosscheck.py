"""The env and the runner cannot drift apart: the core's plateau heuristic run as a policy through
MorphogenesisEnv takes the same decisions and reaches the same accuracy as `esper_fn.run.grow`
(`esper-fn grow --controller heuristic`) on the same seed."""

from __future__ import annotations

import json

import pytest

from esper_fn.controllers import Plateau, PlateauConfig
from esper_fn.envs import ControllerPolicy, MorphogenesisEnv
from esper_fn.events import Advanced, Fossilized, Germinated, Pruned, read_events
from esper_fn.run import RunConfig, grow, param_budget
from esper_fn.tasks import load
from esper_fn.training import evaluate

EPOCHS = 18
SEED = 3
# Grows early (one epoch of < 2 points gain is a plateau) and lets the seed finish within the budget.
PLATEAU = PlateauConfig(patience=1, min_delta=0.02, grow_until=1.0, max_seeds=1, incubate_epochs=2, tempo=3,
                        hold_epochs=2)


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    out = tmp_path_factory.mktemp("grow")
    config = RunConfig(task="mnist1d", host="mlp-impaired", controller="heuristic", epochs=EPOCHS, seed=SEED,
                       plateau=PLATEAU, checkpoint_every=EPOCHS)
    summary = grow(config, out, progress=False)
    events = list(read_events(out / "events.jsonl"))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return config, summary, events, metrics


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
    return out


@pytest.mark.parametrize("lifecycle", ["auto", "full"])
def test_plateau_through_the_env_matches_grow(grown, lifecycle):
    config, summary, events, metrics = grown
    expected = _decisions(events, with_advance=lifecycle == "full")
    assert any(d.startswith("GERMINATE") for _, d in expected), "the run never grew: the check would be vacuous"
    assert any(d.startswith(("FOSSILIZE", "PRUNE")) for _, d in expected), "the seed never reached its verdict"

    task = load(config.task, seed=config.seed)  # grow's task: the seed chooses the validation split
    env = MorphogenesisEnv(contexts=[(task, config.host)], num_envs=1, max_epochs=config.epochs, seed=config.seed,
                           lifecycle=lifecycle, gates=Plateau(PLATEAU).gates, lr=config.lr, train=config.train,
                           governor=config.governor)
    policy = ControllerPolicy(env, lambda: Plateau(PLATEAU), param_budget=param_budget(config, 826))
    td = env.rollout(config.epochs, policy)

    assert [(epoch, d) for _, epoch, d in policy.decisions] == expected
    assert td["next", "metrics", "val_accuracy"][0].tolist() == pytest.approx(
        [m["val_accuracy"] for m in metrics], abs=1e-6)
    assert td["next", "metrics", "params"][0, -1].item() == summary.params_after
    test = evaluate(env.state(0), task.x_test, task.y_test)
    assert test["accuracy"] == pytest.approx(summary.test_accuracy, abs=1e-6)
    assert td["next", "done"][0, -1].item()
