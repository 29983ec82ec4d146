"""The growth environment's observation of a batch of episodes, as a pure function.

`Observer(...)(episodes)` turns `esper_fn.episode.Episode` records into the TensorDict a policy reads:
padded per-slot, graph and global features (`esper_fn.envs.SLOT_FEATURES`, ...; docs/env.md), what
tells instances apart (``"instance"``, `INSTANCE_FEATURES`), the action mask, a few plain metrics,
and under ``"controller"`` the core controllers' `Observation`
(`esper_fn.controllers.observations_to_tensordict`). `MorphogenesisEnv` observes its rows with it and
`PolicyController` (a learned policy in ``esper-fn grow``) observes the run's episode with the same
function, so a policy sees in grow what it saw in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tensordict import TensorDict
from torchrl.data import Bounded, Categorical, Composite, Unbounded

from esper_fn import GateConfig, Op, Stage
from esper_fn.actions import ActionSpace, action_mask
from esper_fn.controllers import observations_to_tensordict, observe
from esper_fn.episode import Episode, sculpt_offered, verdict_due

from ._features import (GLOBAL_FEATURES, INSTANCE_FEATURES, NODE_FEATURES, SLOT_FEATURES, global_row, graph_edges,
                        graph_nodes, instance_row, node_rows, slot_rows)

__all__ = ["METRIC_KEYS", "Observer"]

METRIC_KEYS: tuple[str, ...] = ("val_accuracy", "val_loss", "train_loss", "params", "param_ratio", "epoch",
                                "rollbacks")
"""The plain numbers under ``"metrics"`` (float32 [N] each)."""


@dataclass(frozen=True)
class Observer:
    """Builds observations of episodes (see the module docstring).

    Attributes:
        space: the flat action space (its ``num_slots`` is the slot padding S).
        max_nodes: L, graph nodes per row (padded).
        horizon: H, the length of the controller view's validation history (max episode length + 1).
        gates: the gates the action mask and the controller view's legal ops are built with.
        lifecycle: "auto" (the step advances seeds: ADVANCE is never offered and PRUNE only where a
            verdict is due, `esper_fn.episode.verdict_due`) or "full".
        max_rollbacks: the governor's limit (a global feature is rollbacks / (limit + 1)).
    """

    space: ActionSpace
    max_nodes: int
    horizon: int
    gates: GateConfig
    lifecycle: str
    max_rollbacks: int

    @property
    def max_edges(self) -> int:
        """E, edges per row (padded): both directions of a chain through L nodes."""
        return max(2 * (self.max_nodes - 1), 1)

    def spec(self, n: int, n_contexts: int = 1) -> Composite:
        """The observation spec of `n` rows (every key `__call__` writes)."""
        S, L, E, H = self.space.num_slots, self.max_nodes, self.max_edges, self.horizon
        B, A = len(self.space.blueprints), self.space.n
        f32, f64, i64, b8 = torch.float32, torch.float64, torch.int64, torch.bool
        inf = torch.iinfo(torch.int64).max
        controller = Composite(
            epoch=Unbounded(shape=(n,), dtype=i64), max_epochs=Unbounded(shape=(n,), dtype=i64),
            val_accuracy=Unbounded(shape=(n, H), dtype=f64), val_count=Bounded(0, H, shape=(n,), dtype=i64),
            train_loss=Unbounded(shape=(n,), dtype=f64), params=Unbounded(shape=(n,), dtype=i64),
            param_budget=Bounded(-1, inf, shape=(n,), dtype=i64), germinated=Unbounded(shape=(n,), dtype=i64),
            last_germinated=Bounded(-1, S - 1, shape=(n,), dtype=i64),
            rolled_back=Categorical(2, shape=(n,), dtype=b8),
            slot_valid=Categorical(2, shape=(n, S), dtype=b8), signal=Categorical(2, shape=(n, S), dtype=b8),
            output=Categorical(2, shape=(n, S), dtype=b8), stage=Categorical(len(Stage), shape=(n, S), dtype=i64),
            epochs=Unbounded(shape=(n, S), dtype=i64), health=Unbounded(shape=(n, S), dtype=f64),
            contribution=Unbounded(shape=(n, S), dtype=f64), contribution_se=Unbounded(shape=(n, S), dtype=f64),
            grad_norm=Unbounded(shape=(n, S), dtype=f64),
            ops=Categorical(2, shape=(n, S, len(Op)), dtype=b8),
            seed_params=Bounded(-1, inf, shape=(n, S, B), dtype=i64),
            shape=(n,),
        )
        return Composite(
            slot_features=Unbounded(shape=(n, S, len(SLOT_FEATURES)), dtype=f32),
            slot_mask=Categorical(2, shape=(n, S), dtype=b8),
            slot_blueprint=Categorical(B + 1, shape=(n, S), dtype=i64),
            node_features=Unbounded(shape=(n, L, len(NODE_FEATURES)), dtype=f32),
            node_mask=Categorical(2, shape=(n, L), dtype=b8),
            node_slot=Bounded(-1, S - 1, shape=(n, L), dtype=i64),
            edge_index=Bounded(0, L - 1, shape=(n, 2, E), dtype=i64),
            edge_mask=Categorical(2, shape=(n, E), dtype=b8),
            global_features=Unbounded(shape=(n, len(GLOBAL_FEATURES)), dtype=f32),
            instance=Unbounded(shape=(n, len(INSTANCE_FEATURES)), dtype=f32),
            action_mask=Categorical(2, shape=(n, A), dtype=b8),
            context=Categorical(max(n_contexts, 1), shape=(n,), dtype=i64),
            metrics=Composite({k: Unbounded(shape=(n,), dtype=f32) for k in METRIC_KEYS}, shape=(n,)),
            controller=controller,
            shape=(n,),
        )

    def mask(self, episode: Episode, obs) -> torch.Tensor:
        """The action mask of one episode from its controller observation (WAIT only once done)."""
        if episode.done:
            out = torch.zeros(self.space.n, dtype=torch.bool)
            out[0] = True
            return out
        prunable = None
        if self.lifecycle == "auto":
            prunable = [verdict_due(v.stage, v.ops, v.epochs, self.gates) for v in obs.slots]
        sculptable = list(sculpt_offered(episode.state).values()) if self.space.sculpt else None
        return action_mask(self.space, obs, advance=self.lifecycle == "full", prunable=prunable, sculptable=sculptable)

    def __call__(self, episodes: Sequence[Episode], contexts: Sequence[int] | None = None) -> TensorDict:
        """The observation of `episodes` (batch [N]); `contexts` fills ``"context"`` (default 0)."""
        N, S, L, E = len(episodes), self.space.num_slots, self.max_nodes, self.max_edges
        B = len(self.space.blueprints)
        zs, zn = [0.0] * len(SLOT_FEATURES), [0.0] * len(NODE_FEATURES)
        cols: dict[str, list] = {k: [] for k in ("slot_f", "slot_mask", "slot_bp", "node_f", "node_mask",
                                                 "node_slot", "edge_index", "edge_mask", "glob", "inst")}
        mvals: dict[str, list[float]] = {k: [] for k in METRIC_KEYS}
        bp_index = {b: j for j, b in enumerate(self.space.blueprints)}
        views, masks = [], []
        for ep in episodes:
            state, m = ep.state, ep.metrics
            specs = list(state.slot_specs())
            s_rows = slot_rows(state, specs, m, ep.params0)
            n_s = len(s_rows)
            if n_s > S:
                raise ValueError(f"an episode's host has {n_s} slots; this observer pads to {S}.")
            cols["slot_f"].append(s_rows + [zs] * (S - n_s))
            cols["slot_mask"].append([True] * n_s + [False] * (S - n_s))
            cols["slot_bp"].append([bp_index.get(b, B) if b is not None else B for b in state.blueprints]
                                   + [B] * (S - n_s))
            nodes = graph_nodes(specs)
            n_n = len(nodes)
            cols["node_f"].append(node_rows(state, specs, s_rows) + [zn] * (L - n_n))
            cols["node_mask"].append([True] * n_n + [False] * (L - n_n))
            cols["node_slot"].append([s if k == "slot" else -1 for k, s in nodes] + [-1] * (L - n_n))
            edges = graph_edges(n_n)
            cols["edge_index"].append([[a for a, _ in edges] + [0] * (E - len(edges)),
                                       [b for _, b in edges] + [0] * (E - len(edges))])
            cols["edge_mask"].append([True] * len(edges) + [False] * (E - len(edges)))
            params = state.num_params()
            c = ep.counts
            cols["glob"].append(global_row(
                epoch=ep.epoch, max_epochs=ep.max_epochs, metrics=m, history=ep.evals,
                n_classes=ep.task.n_classes, params=params, params0=ep.params0, flops=m.get("flops", 0.0),
                flops0=ep.flops0, state=state, fossilized=c.fossilized, germinated=c.germinated,
                rollbacks=c.rollbacks, max_rollbacks=self.max_rollbacks))
            cols["inst"].append(instance_row(
                n_train=int(ep.task.x_train.shape[0]), input_shape=ep.task.input_shape, n_classes=ep.task.n_classes,
                epoch=ep.epoch, max_epochs=ep.max_epochs, params=params, params0=ep.params0,
                param_budget=ep.param_budget))
            for k, v in (("val_accuracy", m["val_accuracy"]), ("val_loss", m["val_loss"]),
                         ("train_loss", m.get("train_loss", m["val_loss"])), ("params", float(params)),
                         ("param_ratio", params / ep.params0), ("epoch", float(ep.epoch)),
                         ("rollbacks", float(c.rollbacks))):
                mvals[k].append(v)
            view = observe(ep, self.gates)
            views.append(view)
            masks.append(self.mask(ep, view))
        f32, i64, b8 = torch.float32, torch.int64, torch.bool
        return TensorDict(
            {"slot_features": torch.tensor(cols["slot_f"], dtype=f32),
             "slot_mask": torch.tensor(cols["slot_mask"], dtype=b8),
             "slot_blueprint": torch.tensor(cols["slot_bp"], dtype=i64),
             "node_features": torch.tensor(cols["node_f"], dtype=f32),
             "node_mask": torch.tensor(cols["node_mask"], dtype=b8),
             "node_slot": torch.tensor(cols["node_slot"], dtype=i64),
             "edge_index": torch.tensor(cols["edge_index"], dtype=i64),
             "edge_mask": torch.tensor(cols["edge_mask"], dtype=b8),
             "global_features": torch.tensor(cols["glob"], dtype=f32),
             "instance": torch.tensor(cols["inst"], dtype=f32),
             "action_mask": torch.stack(masks),
             "context": torch.tensor(list(contexts) if contexts is not None else [0] * N, dtype=i64),
             "metrics": TensorDict({k: torch.tensor(v, dtype=f32) for k, v in mvals.items()}, batch_size=[N]),
             "controller": observations_to_tensordict(views, num_slots=S, blueprints=self.space.blueprints,
                                                      horizon=self.horizon)},
            batch_size=[N],
        )
