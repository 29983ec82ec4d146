"""Run an `esper_fn.controllers` controller (static, schedule, plateau heuristic) as a policy over
`MorphogenesisEnv`, in the same process as the env.

The controller reads the core's `Observation` (state, metrics, history, legal actions) through
`MorphogenesisEnv.core_observation`, exactly what `esper_fn.run.grow` shows it, so the env and the
runner can be checked against each other. A learned policy reads only the TensorDict.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict import TensorDictBase

from esper_fn import Op
from esper_fn.controllers import Controller

from ._actions import IllegalActionError
from ._env import MorphogenesisEnv

__all__ = ["ControllerPolicy"]


class ControllerPolicy:
    """A TorchRL-style policy (``policy(td) -> td`` with ``"action"`` set) that asks one controller
    per row and episode.

    In ``lifecycle="auto"`` the env advances seeds itself, so ADVANCE requests are dropped; every
    other request must be legal (an illegal one raises `IllegalActionError` at the step). The
    controller is asked only where `grow` would ask it (not before the first epoch, not after a
    rollback); elsewhere the row waits.

    Args:
        env: the env whose rows the controllers steer (this process only: the controller reads the
            env's core state).
        make_controller: builds a fresh controller for each row's episode, e.g.
            ``lambda: Plateau(PlateauConfig())``.
        param_budget: the parameter budget the controller is told about (`RunConfig.param_budget`).

    Raises:
        IllegalActionError: a controller asked for more than one op in one epoch (the env takes one
            action per row and step), or for a tempo or curve the env does not offer.
    """

    def __init__(self, env: MorphogenesisEnv, make_controller: Callable[[], Controller], *,
                 param_budget: int | None = None):
        self.env = env
        self.make_controller = make_controller
        self.param_budget = param_budget
        self._controllers: dict[int, tuple[object, Controller]] = {}
        self.decisions: list[tuple[int, int, str]] = []  # (row, epoch, action description), non-WAIT only

    def __call__(self, td: TensorDictBase) -> TensorDictBase:
        env = self.env
        actions = []
        for i in range(env.num_envs):
            row = env._row(i)
            held = self._controllers.get(i)
            if held is None or held[0] is not row:
                held = (row, self.make_controller())
                self._controllers[i] = held
            obs = env.core_observation(i, param_budget=self.param_budget)
            if obs is None:
                actions.append(0)
                continue
            requests = [a for a in held[1].decide(obs) if not (env.lifecycle == "auto" and a.op == Op.ADVANCE)]
            if len(requests) > 1:
                raise IllegalActionError(f"row {i}: the controller asked for {len(requests)} ops in one epoch "
                                         f"({requests}); the env takes one action per row and step.")
            if not requests:
                actions.append(0)
                continue
            a = requests[0]
            if a.op == Op.GERMINATE and a.curve != env.curve:
                raise IllegalActionError(f"row {i}: the controller asked for curve {a.curve!r}; this env blends "
                                         f"with {env.curve!r} (MorphogenesisEnv(curve=...)).")
            index = env.action_space.encode(a.op, row.state.index(a.slot), a.blueprint,
                                            a.tempo if a.op == Op.GERMINATE else None)
            self.decisions.append((i, row.epoch, env.describe_action(i, index)))
            actions.append(index)
        td.set("action", torch.tensor(actions, dtype=torch.int64))
        return td
