"""Baseline controllers as TorchRL policies over the env's observation keys.

Each baseline is a `TensorDictModuleBase` that reads ``"action_mask"`` (and the controller view under
``"controller"``) and writes ``"action"`` (the env's flat index), so it runs wherever a learned policy
runs (collectors with worker processes, Ray workers, the evaluation harness). It never imports the
env: the action layout comes in as an `esper_fn.actions.ActionSpace`.

* `StaticPolicy`: always WAIT.
* `RandomPolicy`: WAIT with probability `wait_prob`, else a uniform legal non-WAIT action.
* `ControllerPolicy`: any core controller (`esper_fn.controllers`): each row's ``"controller"`` entry
  is decoded into the controller's `Observation` (`Observation.from_tensordict`), the controller
  decides, and its request is encoded into the flat action. So "schedule" and "heuristic" are
  exactly `esper_fn.controllers.FixedSchedule` and `esper_fn.controllers.Plateau`, the rules
  ``esper-fn grow`` runs; their tuned variants are parameter sets of the same controllers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase

from esper_fn import Op
from esper_fn._errors import ConfigError
from esper_fn.actions import ActionSpace, IllegalActionError, from_action
from esper_fn.controllers import Controller, FixedSchedule, Observation, Plateau, PlateauConfig

__all__ = ["BASELINES", "ControllerPolicy", "RandomPolicy", "StaticPolicy", "make_baseline"]


class _Baseline(TensorDictModuleBase):
    """Shared plumbing: flatten the batch, decide row by row, write ``"action"``.

    A baseline holds no parameters, so TorchRL's collectors have no weights to share with their
    workers (``Collector(..., policy=...)`` and ``MultiSyncCollector(..., policy_factory=...)``).
    """

    in_keys = ["action_mask"]
    out_keys = ["action"]
    name = "baseline"

    def __init__(self, space: ActionSpace):
        super().__init__()
        self.space = space

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        mask = td.get("action_mask")
        lead = mask.shape[:-1]
        flat = td.reshape(-1)
        actions = [self.decide(flat[i]) for i in range(flat.shape[0])]
        out = torch.tensor(actions, dtype=torch.int64).reshape(lead)
        td.set("action", out)
        return td

    def decide(self, row: TensorDictBase) -> int:  # row: one observation (no batch dims)
        raise NotImplementedError


class StaticPolicy(_Baseline):
    """Never grows: always WAIT (action 0)."""

    name = "static"

    def decide(self, row) -> int:
        return 0


class RandomPolicy(_Baseline):
    """Masked random: WAIT with probability `wait_prob`, else uniform over the legal non-WAIT actions.

    Args:
        space: the env's action space.
        wait_prob: probability of WAIT when other actions are legal (0: uniform over non-WAIT).
        seed: seed of the policy's own generator (reset it with `reset_generator`).
    """

    name = "random"

    def __init__(self, space: ActionSpace, *, wait_prob: float = 0.9, seed: int = 0):
        super().__init__(space)
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


class ControllerPolicy(_Baseline):
    """A core controller (`esper_fn.controllers.Controller`) as a TorchRL policy.

    Each row's ``"controller"`` entry becomes the controller's `Observation`; the controller's
    requests become one flat action. ADVANCE requests the mask does not offer are dropped (under the
    env's automatic lifecycle the env advances seeds itself); any other request must be legal. The
    controller acts under its own gates (`Observation.under`) within the env's mask (a germination's
    tempo becomes the nearest one the space offers); the env's gates
    drive the automatic lifecycle, so with ``gates=controller.gates`` the env runs the controller
    exactly as ``esper-fn grow`` does.

    Args:
        controller: the controller (stateless: one serves every row).
        space: the env's action space.
        name: the name in reports (default: the controller's ``name``).

    Raises:
        IllegalActionError: the controller asked for more than one op in one epoch (the env takes
            one action per row and step), or for an action outside the mask.
    """

    in_keys = ["action_mask", "controller"]

    def __init__(self, controller: Controller, space: ActionSpace, *, name: str | None = None):
        super().__init__(space)
        self.controller = controller
        self.name = name or getattr(controller, "name", type(controller).__name__)

    def decide(self, row) -> int:
        obs = Observation.from_tensordict(row["controller"], self.space.blueprints).under(self.controller.gates)
        mask = row["action_mask"]
        names = [v.name for v in obs.slots]
        picks = []
        for a in self.controller.decide(obs):
            if a.op == Op.GERMINATE and a.tempo not in self.space.tempos:  # the nearest tempo offered
                a = replace(a, tempo=min(self.space.tempos, key=lambda t: (abs(t - a.tempo), t)))
            index = from_action(self.space, a, names)
            if not bool(mask[index]):
                if a.op == Op.ADVANCE:
                    continue
                raise IllegalActionError(f"{self.name} asked for {self.space.describe(index)}, which the mask forbids "
                                         f"at epoch {obs.epoch}.")
            picks.append(index)
        if len(picks) > 1:
            raise IllegalActionError(f"{self.name} asked for {len(picks)} ops at epoch {obs.epoch} "
                                     f"({[self.space.describe(i) for i in picks]}); the env takes one action per row "
                                     "and step.")
        return picks[0] if picks else 0


def _heuristic(space: ActionSpace, **params) -> ControllerPolicy:
    return ControllerPolicy(Plateau(PlateauConfig(**params)), space)


def _schedule(space: ActionSpace, **params) -> ControllerPolicy:
    return ControllerPolicy(FixedSchedule(**params), space)


def _static(space: ActionSpace) -> StaticPolicy:
    return StaticPolicy(space)


BASELINES: dict[str, Callable[..., _Baseline]] = {
    "static": _static, "random": RandomPolicy, "schedule": _schedule, "heuristic": _heuristic}
"""Baseline factories by name: ``factory(space, **params)``. "schedule" takes `FixedSchedule`'s fields,
"heuristic" `PlateauConfig`'s, "random" ``wait_prob`` and ``seed``."""


def make_baseline(name: str, space: ActionSpace, **params) -> _Baseline:
    """A baseline policy by name (``static``, ``random``, ``schedule``, ``heuristic``).

    Raises:
        ConfigError: an unknown name or parameter.
    """
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}.")
    try:
        return BASELINES[name](space, **params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"baseline {name!r} with {params}: {e}") from None
