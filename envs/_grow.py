"""Run a TorchRL policy trained on `MorphogenesisEnv` as an `esper_fn.controllers` controller, so
`esper_fn.run.grow` (``esper-fn grow --controller tamiyo``) can use it.

The controller keeps a one-row `MorphogenesisEnv` that is never stepped: after each epoch of the
grow run it loads the run's state and metrics into that row's bookkeeping and lets the env build the
observation (features, graph, action mask) exactly as it does for its own rows. So a policy sees in
grow what it saw in training, and one feature implementation serves both.
"""

from __future__ import annotations

import math

import torch
from tensordict import TensorDictBase
from torchrl.envs.utils import ExplorationType, set_exploration_type

from esper_fn import Op
from esper_fn.controllers import Action, Observation

from ._actions import EnvStateError
from ._env import MorphogenesisEnv, _Row

__all__ = ["PolicyController"]


class PolicyController:
    """A controller (`esper_fn.controllers.Controller`) that asks a TorchRL policy.

    Each decision: the env's automatic lifecycle (``lifecycle="auto"``: a seed advances as soon as
    the gates allow) is applied to the run's state first and returned as ADVANCE requests, then the
    policy reads the env observation of the advanced state and its action is decoded into one more
    request (none for WAIT). The policy runs in deterministic mode (a probabilistic actor takes its
    mode), so a grow run is reproducible.

    The run is the env's episode: the env's ``max_epochs`` is the run's epoch budget (the
    ``epoch_fraction`` feature), its ``max_param_ratio`` follows the run's parameter budget (the
    mask), and the controller is asked at epoch 0 as well (``decides_at_start``: the env's policy
    acts on the reset observation). Two differences from the env remain, both at rollbacks only:
    grow consults no controller in a rolled-back epoch (the env's policy acts there), and grow does
    not re-measure the restored network, so the controller repeats the last validation metrics
    for that epoch in the trend features. Until the first rollback a grow run and an env episode
    with the same seed are the same (tests/test_grow_policy.py).

    Args:
        policy: ``policy(td) -> td`` writing ``"action"`` (e.g. Tamiyo's actor).
        env: a one-row, ``lifecycle="auto"`` env built for the run's task and host
            (``contexts=[(task, host)]``), its budget (``max_epochs``), the run's governor and the
            policy's action space (blueprints, tempos). Its own rows are never reset or stepped.

    Raises:
        EnvStateError: the env has more than one row or the "full" lifecycle.
    """

    name = "policy"
    decides_at_start = True
    blocked: str | None = None

    def __init__(self, policy, env: MorphogenesisEnv):
        if env.num_envs != 1 or env.lifecycle != "auto":
            raise EnvStateError(f"PolicyController needs a one-row env with lifecycle='auto', got num_envs="
                                f"{env.num_envs}, lifecycle={env.lifecycle!r}.")
        self.policy = policy
        self.env = env
        self.gates = env.gates
        self._track: dict | None = None  # the row's episode bookkeeping (see state_dict)

    # -- the controller protocol --------------------------------------------------------------------
    def decide(self, obs: Observation) -> list[Action]:
        env, t = self.env, self._track
        m = obs.metrics
        current = {"val_accuracy": float(m["val_accuracy"]), "val_loss": float(m["val_loss"])}
        if obs.epoch == 0:
            params0 = obs.state.num_params()
            t = self._track = {"params0": params0, "flops0": float(m["flops"]), "evals": [current], "epoch": 0,
                               "rollbacks": 0, "germinated": 0, "fossilized": 0, "pruned": 0}
            ratio = None
            if obs.param_budget is not None:  # the env's limit is ratio x params0: make it reach the budget
                ratio = obs.param_budget / params0
                while ratio * params0 < obs.param_budget:
                    ratio = math.nextafter(ratio, math.inf)
            env.max_param_ratio = ratio
        else:
            if t is None:
                raise EnvStateError("PolicyController was first asked after epoch 0; it must see the reset "
                                    "evaluation (esper_fn.run.grow asks controllers with decides_at_start=True "
                                    "at epoch 0, and restores them with load_state_dict on resume).")
            for _ in range(t["epoch"] + 1, obs.epoch):  # epochs grow rolled back: no decision was asked
                t["rollbacks"] += 1
                t["evals"].append(dict(t["evals"][-1]))
            t["evals"].append(current)
            t["epoch"] = obs.epoch
        state = env._auto_advance(obs.state, m)
        requests = [Action(Op.ADVANCE, slot=n) for n in state.slot_names if state.stage(n) != obs.state.stage(n)]
        if obs.epoch >= obs.max_epochs:  # the env's episode ends here: no more actions
            return requests
        env._rows[0] = _Row(context=0, run_seed=-1, streams=None, state=state, params0=t["params0"],
                            flops0=t["flops0"], metrics=dict(m), evals=t["evals"], epoch=obs.epoch,
                            rollbacks=t["rollbacks"], germinated=t["germinated"], fossilized=t["fossilized"],
                            pruned=t["pruned"])
        index = self._act(env._observe())
        act = env.action_space.decode(index)
        if act.op == Op.WAIT:
            return requests
        slot = state.slot_names[act.slot]
        if act.op == Op.GERMINATE:
            t["germinated"] += 1
            return [*requests, Action(Op.GERMINATE, slot=slot, blueprint=act.blueprint, tempo=act.tempo,
                                      curve=env.curve)]
        if act.op == Op.FOSSILIZE:
            t["fossilized"] += 1
        elif act.op == Op.PRUNE:
            t["pruned"] += 1
        reason = f"pruned by the policy at {state.stage(slot).name}" if act.op == Op.PRUNE else None
        return [*requests, Action(act.op, slot=slot, reason=reason)]

    def _act(self, td: TensorDictBase) -> int:
        with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
            out = self.policy(td)
        index = int(out.get("action").reshape(-1)[0])
        if not bool(td.get("action_mask")[0, index]):  # the env would refuse it: so does grow
            self.env._mask[0] = td.get("action_mask")[0]
            self.env._check(0, self.env._rows[0], index)
        return index

    # -- checkpointing (esper_fn.run saves and restores it with the run) ----------------------------
    def state_dict(self) -> dict:
        """The episode bookkeeping the observations need (JSON-serialisable)."""
        return {"track": self._track, "max_param_ratio": self.env.max_param_ratio}

    def load_state_dict(self, d: dict) -> None:
        self._track = d["track"]
        self.env.max_param_ratio = d["max_param_ratio"]

