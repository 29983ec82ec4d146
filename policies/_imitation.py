"""Imitation for Tamiyo: start from the best behaviour available, the per-instance oracle.

On the benchmark's TRAIN split, each instance's teacher is the member of the fixed-policy family
(`esper_fn.controllers.Recipe`) with the best mean final validation accuracy over the training seeds
(`teachers`). The teachers play their instances through the env, at several horizons, and their
observations and actions are recorded (`demonstrations`); `behavior_clone` then fits Tamiyo's
masked policy to those actions (weighted cross-entropy: the few growth decisions weigh as much as
the many WAITs), and warms its critic up on the demonstrations' discounted returns. The test split
never enters: teachers are chosen on the train split's records, on training seeds only.

Collected demonstrations are a TorchRL replay buffer on disk (`esper_fn.policies.save_rollouts`), so
a later run reuses them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.envs.utils import ExplorationType, set_exploration_type

from esper_fn._errors import ConfigError
from esper_fn.bench import Instance

from ._eval import RunRecord

__all__ = ["behavior_clone", "demonstrations", "teachers"]


def teachers(records: Sequence[RunRecord], instances: Sequence[Instance]) -> dict[str, str]:
    """Each train instance's teacher: the fixed-policy member (``static`` or ``recipe:...``) with the
    best mean final validation accuracy over the instance's training-seed runs (ties: fewer mean
    parameters, then the name).

    Raises:
        ConfigError: an instance is not in the train split, or has no family records.
    """
    out = {}
    for inst in instances:
        if inst.split != "train":
            raise ConfigError(f"instance {inst.name!r} is in the {inst.split} split; teachers come from the train split.")
        mine: dict[str, list[RunRecord]] = {}
        for r in records:
            if r.instance == inst.name and r.split == "train" and (r.controller == "static"
                                                                  or r.controller.startswith("recipe:")):
                mine.setdefault(r.controller, []).append(r)
        if not mine:
            raise ConfigError(f"no train-split family records of instance {inst.name!r}: run esper-fn bench run --split "
                              "train --controllers astar (or test with astar) first.")

        def score(name: str) -> tuple[float, float, str]:
            rs = mine[name]
            return (sum(r.val_accuracy for r in rs) / len(rs), -sum(r.params for r in rs) / len(rs), name)

        out[inst.name] = max(mine, key=score)
    return out


def demonstrations(make_env: Callable[..., Any], plays: Sequence[tuple[Instance, str]], seeds: Sequence[int],
                   make_policy: Callable[[str, Any], Any], *, progress: bool = True) -> TensorDict:
    """The teachers' transitions: every (instance, teacher) played on every seed.

    Args:
        make_env: ``make_env(instances=[...], num_envs=n, seed=s)``.
        plays: ``[(instance, teacher name), ...]`` (an instance may come at several horizons).
        seeds: contiguous run seeds (training seeds).
        make_policy: ``make_policy(name, action_space) -> policy``.

    Returns:
        A TensorDict of transitions [M]: the observation keys (but the controller view), ``"action"``
        and ``"return"`` (the discounted return to the episode's end, gamma 0.99, of the env's
        reward: the critic's warm-up target).
    """
    seeds = list(seeds)
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ConfigError(f"demonstration seeds must be contiguous, got {seeds}.")
    parts = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plays), desc="demonstrations", unit="play")
    for inst, teacher in plays:
        env = make_env(instances=[inst], num_envs=len(seeds), seed=seeds[0])
        policy = make_policy(teacher, env.action_space)
        with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
            td = env.rollout(inst.epochs, policy, break_when_any_done=False)
        reward = td["next", "reward"].squeeze(-1)
        ret = torch.zeros_like(reward)
        acc = torch.zeros(reward.shape[0])
        for t in range(reward.shape[1] - 1, -1, -1):
            acc = reward[:, t] + 0.99 * acc
            ret[:, t] = acc
        obs = td.exclude("next", "controller")
        obs.set("return", ret.unsqueeze(-1))
        parts.append(obs.reshape(-1))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(last=f"{inst.name}/{inst.epochs}ep")
    if bar is not None:
        bar.close()
    return torch.cat(parts)


def behavior_clone(actor, critic, data: TensorDictBase, *, epochs: int = 30, lr: float = 1e-3,
                   batch_size: int = 256, generator: torch.Generator | None = None,
                   holdout: float = 0.1, on_epoch: Callable[[int, Mapping[str, float]], None] | None = None
                   ) -> dict[str, float]:
    """Fit Tamiyo's policy to demonstrated actions and warm its critic up on their returns.

    The loss is the cross-entropy of the masked logits at the demonstrated action, weighted so that
    the non-WAIT actions (a few per episode) weigh as much in total as the WAITs, plus the critic's
    squared error on each value head against the discounted return.

    Args:
        actor, critic: Tamiyo's modules (`make_tamiyo`; they share the trunk).
        data: `demonstrations`.
        epochs: passes over the training part.
        lr: Adam learning rate.
        batch_size: transitions per step.
        generator: shuffles, and draws the held-out part.
        holdout: fraction of transitions held out to measure imitation accuracy.
        on_epoch: called with (epoch, metrics) after every pass.

    Returns:
        The last epoch's metrics: ``loss``, ``value_loss``, ``train_accuracy`` and
        ``holdout_accuracy`` (argmax action equals the demonstrated one), and the same two on the
        non-WAIT actions only (``*_growth_accuracy``).
    """
    from ._tamiyo import tamiyo_parameters

    g = generator or torch.Generator().manual_seed(0)
    n = data.shape[0]
    perm = torch.randperm(n, generator=g)
    n_hold = int(round(holdout * n))
    hold, train = data[perm[:n_hold]], data[perm[n_hold:]]
    act = train["action"]
    growth = act != 0
    w_growth = (~growth).sum().clamp_min(1) / growth.sum().clamp_min(1)
    params = tamiyo_parameters(actor, critic)
    opt = torch.optim.Adam(params, lr=lr)
    common, head = actor.module[0], actor.module[1]
    metrics: dict[str, float] = {}

    def logits_of(td):
        out = head(common(td.select(*common.in_keys).clone()))
        return out["logits"].masked_fill(~td["action_mask"], -1e9), out["value_ensemble"]

    def accuracy(td) -> tuple[float, float]:
        with torch.no_grad():
            pred = logits_of(td)[0].argmax(-1)
        ok = pred == td["action"]
        grow = td["action"] != 0
        return float(ok.float().mean()), float(ok[grow].float().mean()) if grow.any() else math.nan

    for e in range(epochs):
        order = torch.randperm(train.shape[0], generator=g)
        tot, vtot, k = 0.0, 0.0, 0
        for idx in order.split(batch_size):
            mb = train[idx]
            logits, values = logits_of(mb)
            w = torch.where(mb["action"] != 0, w_growth.float(), torch.ones(()))
            ce = torch.nn.functional.cross_entropy(logits, mb["action"], reduction="none")
            loss = (w * ce).sum() / w.sum()
            vloss = (values - mb["return"]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            (loss + vloss).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            tot, vtot, k = tot + float(loss.detach()), vtot + float(vloss.detach()), k + 1
        ta, tg = accuracy(train)
        ha, hg = accuracy(hold) if n_hold else (math.nan, math.nan)
        metrics = {"loss": tot / k, "value_loss": vtot / k, "train_accuracy": ta, "train_growth_accuracy": tg,
                   "holdout_accuracy": ha, "holdout_growth_accuracy": hg}
        if on_epoch is not None:
            on_epoch(e + 1, metrics)
    return metrics
