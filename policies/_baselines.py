"""Baseline controllers as TorchRL policies over the env's observation keys.

Each baseline is a `TensorDictModuleBase` that reads ``"action_mask"``, ``"slot_features"``,
``"slot_mask"``, ``"global_features"`` and ``"metrics"`` and writes ``"action"`` (the env's flat
index), so it runs wherever a learned policy runs (collectors, Ray workers, the eval harness). It
never imports the env: the action layout and feature names come in a `Layout`.

* `StaticPolicy`: always WAIT.
* `RandomPolicy`: WAIT with probability `wait_prob`, else a uniform legal non-WAIT action.
* `SchedulePolicy`: periodic growth (the `esper_fn.controllers.FixedSchedule` rule on
  observations): from epoch `start`, every `every` epochs with no live seed, germinate the
  preferred blueprint at the next candidate slot (round-robin); fossilize every seed at HOLDING.
* `HeuristicPolicy`: the plateau heuristic (`esper_fn.controllers.Plateau` on observations):
  germinate when validation accuracy has not reached a new best for `patience` epochs, before
  `grow_until` of the budget, while the train loss is above `min_train_loss`, at most `max_seeds`
  seeds; fossilize at HOLDING after `hold_epochs` if the measured contribution reaches
  `min_contribution`, prune otherwise.

Both growing heuristics pick where and what with `esper_fn.controllers.choose_seed`'s family rule:
on a signal slot (the raw input vector, or a conv feature map) a residual Conv1d block
(``conv1d_k5``, then ``conv1d_k3``), elsewhere a residual GELU MLP (``mlp_gelu``, then
``mlp_gelu_x0_5``), never at the output slot; signal slots first, then by depth; the first
blueprint of the family that the action mask allows (the mask carries blueprint fit and the env's
parameter budget).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase

from esper_fn._errors import ConfigError

__all__ = ["BASELINES", "HeuristicPolicy", "Layout", "RandomPolicy", "SchedulePolicy", "StaticPolicy",
           "make_baseline"]

SIGNAL_FAMILY = ("conv1d_k5", "conv1d_k3")
HIDDEN_FAMILY = ("mlp_gelu", "mlp_gelu_x0_5")


@dataclass(frozen=True)
class Layout:
    """What a policy needs to know about an env without importing it.

    Attributes:
        blueprints: ``env.action_space.blueprints`` (ids, index order).
        tempos: ``env.action_space.tempos``.
        slot_features: names of the ``slot_features`` columns (``esper_fn.envs.SLOT_FEATURES``).
        global_features: names of the ``global_features`` columns (``esper_fn.envs.GLOBAL_FEATURES``).
    """

    blueprints: tuple[str, ...]
    tempos: tuple[int, ...]
    slot_features: tuple[str, ...]
    global_features: tuple[str, ...]

    @classmethod
    def of(cls, env, slot_features: Sequence[str], global_features: Sequence[str]) -> Layout:
        """The layout of an env (anything with an ``action_space`` of blueprints and tempos)."""
        return cls(tuple(env.action_space.blueprints), tuple(env.action_space.tempos), tuple(slot_features),
                   tuple(global_features))

    def germinate(self, S: int, slot: int, blueprint: int, tempo: int) -> int:
        B, T = len(self.blueprints), len(self.tempos)
        return 1 + (slot * B + blueprint) * T + tempo

    def op(self, S: int, which: str, slot: int) -> int:
        base = 1 + S * len(self.blueprints) * len(self.tempos)
        return base + {"advance": 0, "fossilize": 1, "prune": 2}[which] * S + slot

    def sf(self, name: str) -> int:
        return self.slot_features.index(name)

    def gf(self, name: str) -> int:
        return self.global_features.index(name)


class _Baseline(TensorDictModuleBase):
    """Shared plumbing: flatten the batch, decide row by row, write ``"action"``."""

    in_keys = ["action_mask", "slot_features", "slot_mask", "global_features", ("metrics", "epoch"),
               ("metrics", "train_loss")]
    out_keys = ["action"]
    name = "baseline"

    def __init__(self, layout: Layout):
        super().__init__()
        self.layout = layout

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        mask = td.get("action_mask")
        lead = mask.shape[:-1]
        flat = td.reshape(-1) if len(lead) != 1 else td
        if len(lead) == 0:
            flat = td.unsqueeze(0)
        actions = [self.decide(flat[i]) for i in range(flat.shape[0])]
        out = torch.tensor(actions, dtype=torch.int64).reshape(lead)
        for a, m in zip(out.reshape(-1).tolist(), mask.reshape(-1, mask.shape[-1])):
            if not m[a]:
                raise ConfigError(f"{self.name} chose masked action {a}: a bug in the baseline.")
        td.set("action", out)
        return td

    def decide(self, row: TensorDictBase) -> int:  # row: one observation (no batch dims)
        raise NotImplementedError

    # -- helpers on one row ----------------------------------------------------------------------
    def _stage(self, row, s: int, stage: str) -> bool:
        return bool(row["slot_features"][s, self.layout.sf(f"stage_{stage}")] > 0.5)

    def _manage(self, row, *, hold_epochs: int, min_contribution: float | None) -> int | None:
        """ADVANCE where legal (``lifecycle="full"``); the verdict at HOLDING. None: nothing to do."""
        L, mask = self.layout, row["action_mask"]
        S = int(row["slot_mask"].shape[-1])
        for s in range(int(row["slot_mask"].sum())):
            if mask[L.op(S, "advance", s)] and not self._stage(row, s, "holding"):
                return L.op(S, "advance", s)
            if not self._stage(row, s, "holding"):
                continue
            epochs = float(row["slot_features"][s, L.sf("epochs_in_stage")]) * 10
            if epochs + 1e-6 < hold_epochs:
                continue
            c = float(row["slot_features"][s, L.sf("contribution")]) / 10
            keep = min_contribution is None or c >= min_contribution
            if keep and mask[L.op(S, "fossilize", s)]:
                return L.op(S, "fossilize", s)
            if mask[L.op(S, "prune", s)]:
                return L.op(S, "prune", s)
        return None

    def _candidates(self, row) -> list[tuple[int, int]]:
        """(slot, blueprint index) pairs the family rule allows now, best first."""
        L, mask = self.layout, row["action_mask"]
        S = int(row["slot_mask"].shape[-1])
        n = int(row["slot_mask"].sum())
        f = row["slot_features"]
        out = []
        for s in range(n - 1):  # never the output slot
            signal = bool(f[s, L.sf("kind_conv1d")] > 0.5) or (
                bool(f[s, L.sf("kind_vector")] > 0.5) and bool(f[s, L.sf("is_input")] > 0.5)
                and float(f[s, L.sf("log_features")]) * 8 >= 3 - 1e-6)
            for name in (SIGNAL_FAMILY if signal else HIDDEN_FAMILY):
                b = _find(L.blueprints, name)
                if b is not None and any(mask[L.germinate(S, s, b, t)] for t in range(len(L.tempos))):
                    out.append((0 if signal else 1, s, b))
                    break
        return [(s, b) for _, s, b in sorted(out)]

    def _germ(self, row, s: int, b: int, tempo: int) -> int:
        L = self.layout
        S = int(row["slot_mask"].shape[-1])
        t = min(range(len(L.tempos)), key=lambda i: abs(L.tempos[i] - tempo))
        return L.germinate(S, s, b, t)

    def _live(self, row) -> bool:
        return any(self._stage(row, s, st) for s in range(int(row["slot_mask"].sum()))
                   for st in ("germinated", "training", "blending", "holding"))


def _find(blueprints: Sequence[str], name: str) -> int | None:
    for i, b in enumerate(blueprints):
        if b.split("@")[0] == name:
            return i
    return None


class StaticPolicy(_Baseline):
    """Never grows: always WAIT (action 0)."""

    name = "static"

    def decide(self, row) -> int:
        return 0


class RandomPolicy(_Baseline):
    """Masked random: WAIT with probability `wait_prob`, else uniform over the legal non-WAIT actions.

    Args:
        layout: the env's `Layout`.
        wait_prob: probability of WAIT when other actions are legal (0: uniform over non-WAIT).
        seed: seed of the policy's own generator (reset it with `reset_generator`).
    """

    name = "random"

    def __init__(self, layout: Layout, *, wait_prob: float = 0.9, seed: int = 0):
        super().__init__(layout)
        if not 0 <= wait_prob <= 1:
            raise ConfigError(f"wait_prob must be in [0, 1], got {wait_prob}.")
        self.wait_prob, self.seed = float(wait_prob), int(seed)
        self.reset_generator()

    def reset_generator(self, seed: int | None = None) -> None:
        self.generator = torch.Generator().manual_seed(self.seed if seed is None else int(seed))

    def decide(self, row) -> int:
        legal = row["action_mask"].nonzero().flatten()[1:]
        if len(legal) == 0 or torch.rand((), generator=self.generator) < self.wait_prob:
            return 0
        return int(legal[torch.randint(len(legal), (), generator=self.generator)])


class SchedulePolicy(_Baseline):
    """Periodic growth: see the module docstring.

    Args:
        layout: the env's `Layout`.
        start: first epoch at which it germinates (>= 1).
        every: epochs between germination attempts.
        tempo: blending tempo (the nearest offered one).
        hold_epochs: epochs at HOLDING before it fossilizes.
        max_seeds: germinations per episode.
    """

    name = "schedule"

    def __init__(self, layout: Layout, *, start: int = 1, every: int = 20, tempo: int = 5, hold_epochs: int = 2,
                 max_seeds: int = 8):
        super().__init__(layout)
        self.start, self.every, self.tempo, self.hold_epochs, self.max_seeds = start, every, tempo, hold_epochs, max_seeds

    def decide(self, row) -> int:
        a = self._manage(row, hold_epochs=self.hold_epochs, min_contribution=None)
        if a is not None:
            return a
        epoch = int(round(float(row["metrics", "epoch"])))
        n = int(row["slot_mask"].sum())
        germinated = int(round(float(row["global_features"][self.layout.gf("seeds_germinated")]) * n))
        if epoch < self.start or (epoch - self.start) % self.every or self._live(row) or germinated >= self.max_seeds:
            return 0
        cands = self._candidates(row)
        if not cands:
            return 0
        s, b = cands[germinated % len(cands)]
        return self._germ(row, s, b, self.tempo)


class HeuristicPolicy(_Baseline):
    """The plateau heuristic on observations: see the module docstring; parameters as in
    `esper_fn.controllers.PlateauConfig` (patience, min_train_loss, grow_until, max_seeds, tempo,
    hold_epochs, min_contribution)."""

    name = "heuristic"

    def __init__(self, layout: Layout, *, patience: int = 2, min_train_loss: float = 0.5, grow_until: float = 0.5,
                 max_seeds: int = 2, tempo: int = 5, hold_epochs: int = 3, min_contribution: float = 0.005):
        super().__init__(layout)
        self.patience, self.min_train_loss, self.grow_until = patience, min_train_loss, grow_until
        self.max_seeds, self.tempo, self.hold_epochs, self.min_contribution = max_seeds, tempo, hold_epochs, min_contribution

    def decide(self, row) -> int:
        a = self._manage(row, hold_epochs=self.hold_epochs, min_contribution=self.min_contribution)
        if a is not None:
            return a
        L, g = self.layout, row["global_features"]
        epoch = float(row["metrics", "epoch"])
        n = int(row["slot_mask"].sum())
        germinated = int(round(float(g[L.gf("seeds_germinated")]) * n))
        if epoch < 1 or self._live(row) or germinated >= self.max_seeds:
            return 0
        if float(g[L.gf("epoch_fraction")]) > self.grow_until or float(row["metrics", "train_loss"]) < self.min_train_loss:
            return 0
        since_best = float(g[L.gf("epochs_since_best")]) * 10
        if epoch <= self.patience or since_best + 1e-6 < self.patience:
            return 0
        cands = self._candidates(row)
        if not cands:
            return 0
        s, b = cands[0]
        return self._germ(row, s, b, self.tempo)


BASELINES = {"static": StaticPolicy, "random": RandomPolicy, "schedule": SchedulePolicy, "heuristic": HeuristicPolicy}


def make_baseline(name: str, layout: Layout, **params) -> _Baseline:
    """A baseline policy by name (``static``, ``random``, ``schedule``, ``heuristic``).

    Raises:
        ConfigError: an unknown name or parameter.
    """
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}.")
    try:
        return BASELINES[name](layout, **params)
    except TypeError as e:
        raise ConfigError(f"baseline {name!r}: {e}") from None
