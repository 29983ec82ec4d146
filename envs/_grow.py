"""A TorchRL policy trained on `MorphogenesisEnv` as an `esper_fn.controllers` controller, so
`esper_fn.run.grow` (``esper-fn grow --controller tamiyo``) can run it.

The controller observes the run's episode with the env's own `Observer` (the same pure function the
env uses for its rows), asks the policy, and turns the flat action into a core `Action`. So a policy
sees in grow exactly what it saw in training, and the growth step it drives is the same one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from esper_fn import ConfigError, GateConfig
from esper_fn import blueprints as bpm
from esper_fn.actions import ActionSpace, IllegalActionError, to_action
from esper_fn.controllers import Action, Observation
from esper_fn.episode import GovernorConfig

from ._features import graph_nodes
from ._observe import Observer

__all__ = ["PolicyController", "tamiyo_controller"]


class PolicyController:
    """A controller (`esper_fn.controllers.Controller`) that asks a TorchRL policy.

    Each decision: the run's episode (``obs.episode``; the automatic lifecycle has advanced its
    seeds already) is observed with `Observer`, the policy runs in deterministic mode (a
    probabilistic actor takes its mode, so a grow run is reproducible), and its action becomes one
    request (none for WAIT). Build it with the env configuration the policy was trained with:
    its action space (blueprints, tempos), its gates and governor.

    Args:
        policy: ``policy(td) -> td`` writing ``"action"`` (e.g. Tamiyo's actor).
        blueprints, tempos: the policy's action space.
        gates: the lifecycle gates it was trained under (the env's default
            ``GateConfig(min_training_epochs=3, max_grad_norm=1e3)``); the run uses them.
        governor: the run's governor (a global feature reads its rollback limit).
        max_slots: slot padding of the observation (at least the host's slot count; per-slot heads
            make the policy independent of it).
        curve: the alpha curve of its germinations.
    """

    name = "policy"
    blocked: str | None = None

    def __init__(self, policy, *, blueprints, tempos, gates: GateConfig | None = None,
                 governor: GovernorConfig | None = None, max_slots: int = 8, curve: str = "linear"):
        self.policy = policy
        self.gates = gates or GateConfig(min_training_epochs=3, max_grad_norm=1e3)
        self.governor = governor or GovernorConfig()
        self.space = ActionSpace(max_slots, tuple(blueprints), tuple(int(t) for t in tempos))
        self.curve = curve

    def observer(self, max_epochs: int, n_nodes: int) -> Observer:
        """The observer for an episode of `max_epochs` epochs over a host graph of `n_nodes` nodes."""
        return Observer(self.space, max_nodes=n_nodes, horizon=max_epochs + 1, gates=self.gates, lifecycle="auto",
                        max_rollbacks=self.governor.max_rollbacks)

    def decide(self, obs: Observation) -> list[Action]:
        ep = obs.episode
        if ep is None:
            raise ConfigError("PolicyController reads the episode record: give it observations built by "
                              "esper_fn.controllers.observe (esper_fn.run.grow does), not decoded ones.")
        n_nodes = len(graph_nodes(list(ep.state.slot_specs())))
        td = self.observer(ep.max_epochs, n_nodes)([ep])
        with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
            out = self.policy(td)
        index = int(out.get("action").reshape(-1)[0])
        if not bool(td["action_mask"][0, index]):
            raise IllegalActionError(f"the policy chose action {index} ({self.space.describe(index, ep.state.slot_names)}), "
                                     "which the mask forbids; a policy must sample from observation['action_mask'].")
        a = to_action(self.space, index, ep.state.slot_names, curve=self.curve, reason="pruned by the policy")
        return [] if a is None else [a]


def tamiyo_controller(spec: str = "tamiyo", *, governor: GovernorConfig | None = None) -> PolicyController:
    """Tamiyo's actor as a controller: ``"tamiyo"`` (the shipped weights) or ``"tamiyo:PATH"``.

    Raises:
        ConfigError: no weights file at PATH.
        TamiyoError: the file is not Tamiyo weights.
    """
    from esper_fn.policies import SHIPPED_WEIGHTS, load_tamiyo

    _, _, path = spec.partition(":")
    path = Path(path) if path else SHIPPED_WEIGHTS
    if not path.is_file():
        raise ConfigError(f"controller {spec!r}: no Tamiyo weights at {path}; give the .safetensors file "
                          "`esper-fn train-tamiyo` wrote (OUT/tamiyo.safetensors), or `tamiyo` for the shipped policy.")
    actor, _, _ = load_tamiyo(path)
    c = actor.tamiyo_config
    missing = [b for b in c.blueprints if b not in bpm.registry()]
    if missing:
        raise ConfigError(f"controller {spec!r}: the policy offers blueprints this esper_fn does not know: {missing}.")
    return PolicyController(actor, blueprints=c.blueprints, tempos=c.tempos, governor=governor)
