"""Tamiyo as TorchRL modules: factory, save and load.

`make_tamiyo` wires `TamiyoTrunk` (shared GATv2 encoder + value ensemble) and `TamiyoHead` (flat
logits and harm logits) into an `ActorValueOperator`: the actor is a `ProbabilisticActor` sampling a
`MaskedCategorical` from ``{"logits": "logits", "mask": "action_mask"}``, the critic a
`ValueOperator` writing ``"state_value"`` (ensemble mean) and ``"value_uncertainty"`` (its standard
deviation). The env is never imported: its dimensions come from the specs passed in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, Field
from tensordict.nn import TensorDictModule
from torchrl.modules import ActorValueOperator, MaskedCategorical, ProbabilisticActor, ValueOperator

from esper_fn._errors import EsperError

from esper_fn.actions import ActionSpace

from ._net import TamiyoHead, TamiyoTrunk, ValueReduce

__all__ = ["OBS_KEYS", "TamiyoConfig", "TamiyoError", "load_tamiyo", "make_tamiyo", "save_tamiyo", "tamiyo_parameters"]

OBS_KEYS: tuple[str, ...] = ("node_features", "node_mask", "node_slot", "edge_index", "edge_mask",
                             "global_features", "slot_mask", "slot_blueprint")
"""The observation keys Tamiyo reads (plus ``"action_mask"`` for sampling)."""

FORMAT = "esper_fn.tamiyo/1"


class TamiyoError(EsperError, ValueError):
    """A Tamiyo checkpoint or configuration does not fit the env it is used with."""


class TamiyoConfig(BaseModel):
    """Architecture of a Tamiyo network (everything needed to rebuild it from a weights file).

    Attributes:
        node_dim: features per graph node (``node_features.shape[-1]``).
        global_dim: global features (``global_features.shape[-1]``).
        blueprints: the blueprint ids of the action space, in index order (B = their count).
        tempos: the tempos of the action space (T = their count).
        hidden: embedding width.
        heads: GATv2 attention heads.
        layers: GATv2 layers.
        value_heads: size of the value ensemble (its spread is the uncertainty estimate).
        dropout: MLP dropout.
        safety_bias: decision-time penalty ``safety_bias * P(harm)`` on non-WAIT logits (0: off).
        uncertainty_bias: decision-time bonus ``uncertainty_bias * value_std`` on WAIT (0: off).
        wait_bias: initial bias of the WAIT logit (init only; ln(k) makes WAIT as likely as k
            other actions together at the start of training).
        instance_dim: instance features the trunk reads beside the globals (the observation's
            ``"instance"``: data size, input kind, classes, horizon, budget room); 0 for policies
            trained before the env had them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    node_dim: int = Field(ge=1)
    global_dim: int = Field(ge=1)
    blueprints: tuple[str, ...]
    tempos: tuple[int, ...]
    hidden: int = Field(default=64, ge=4)
    heads: int = Field(default=4, ge=1)
    layers: int = Field(default=2, ge=1)
    value_heads: int = Field(default=5, ge=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    safety_bias: float = Field(default=0.0, ge=0)
    uncertainty_bias: float = Field(default=0.0, ge=0)
    wait_bias: float = 0.0
    instance_dim: int = Field(default=0, ge=0)


def config_from_specs(observation_spec, action_spec, *, blueprints, tempos, **kwargs) -> TamiyoConfig:
    """A `TamiyoConfig` for an env's specs; checks that the flat action space has the documented
    layout ``1 + S*B*T + 3*S``.

    Args:
        observation_spec: the env's observation `Composite` (needs the `OBS_KEYS` and
            ``"action_mask"``).
        action_spec: the env's action spec (a `Categorical` with ``n`` actions), or None.
        blueprints: blueprint ids of the action space (``env.action_space.blueprints``).
        tempos: tempos of the action space (``env.action_space.tempos``).
        kwargs: `TamiyoConfig` architecture fields.

    Raises:
        TamiyoError: a key is missing or the action space does not have the expected size.
    """
    missing = [k for k in (*OBS_KEYS, "action_mask") if k not in observation_spec.keys()]
    if missing:
        raise TamiyoError(f"the observation spec lacks {missing}; Tamiyo reads {list(OBS_KEYS)} and 'action_mask' "
                          "(MorphogenesisEnv's keys, docs/env.md).")
    S = observation_spec["slot_mask"].shape[-1]
    A = observation_spec["action_mask"].shape[-1]
    expected = ActionSpace(S, tuple(blueprints), tuple(int(t) for t in tempos)).n
    if A != expected or (action_spec is not None and getattr(action_spec, "n", A) != A):
        raise TamiyoError(f"the action mask has {A} actions but S={S} slots, B={len(blueprints)} blueprints and "
                          f"T={len(tempos)} tempos give 1 + S*B*T + 3*S = {expected}; pass the env's "
                          "action_space.blueprints and .tempos.")
    kwargs.setdefault("instance_dim", observation_spec["instance"].shape[-1] if "instance" in observation_spec.keys()
                      else 0)
    return TamiyoConfig(node_dim=observation_spec["node_features"].shape[-1],
                        global_dim=observation_spec["global_features"].shape[-1],
                        blueprints=tuple(blueprints), tempos=tuple(int(t) for t in tempos), **kwargs)


def build_tamiyo(config: TamiyoConfig, action_spec=None) -> tuple[ProbabilisticActor, ValueOperator,
                                                                    ActorValueOperator]:
    """Build (actor, critic, joint operator) from a config; weights are initialised from the global
    RNG (seed it, or load weights, for reproducibility)."""
    B, T = len(config.blueprints), len(config.tempos)
    trunk = TamiyoTrunk(config.node_dim, config.global_dim, B, hidden=config.hidden, heads=config.heads,
                        layers=config.layers, value_heads=config.value_heads, dropout=config.dropout,
                        instance_dim=config.instance_dim)
    head = TamiyoHead(config.hidden, B, T, safety_bias=config.safety_bias, uncertainty_bias=config.uncertainty_bias)
    with torch.no_grad():
        head.wait[-1].bias[0] += config.wait_bias
    hidden_keys = [("tamiyo", "graph"), ("tamiyo", "slots"), "value_ensemble"]
    common = TensorDictModule(trunk, in_keys=list(OBS_KEYS) + (["instance"] if config.instance_dim else []),
                              out_keys=hidden_keys)
    policy_head = TensorDictModule(head, in_keys=hidden_keys, out_keys=["logits", "harm_logits", "value_uncertainty"])
    actor_head = ProbabilisticActor(policy_head, in_keys={"logits": "logits", "mask": "action_mask"},
                                    out_keys=["action"], distribution_class=MaskedCategorical,
                                    return_log_prob=True, spec=action_spec)
    value_head = ValueOperator(ValueReduce(), in_keys=["value_ensemble"], out_keys=["state_value", "value_uncertainty"])
    joint = ActorValueOperator(common, actor_head, value_head)
    return joint.get_policy_operator(), joint.get_value_operator(), joint


def make_tamiyo(observation_spec, action_spec, *, blueprints, tempos, **kwargs):
    """Tamiyo's actor and critic for an env, from its specs.

    Args:
        observation_spec: the env's observation spec (``env.observation_spec``).
        action_spec: the env's action spec (``env.action_spec``), attached to the actor.
        blueprints: ``env.action_space.blueprints``.
        tempos: ``env.action_space.tempos``.
        kwargs: `TamiyoConfig` architecture fields (hidden, heads, layers, value_heads, dropout,
            safety_bias, uncertainty_bias).

    Returns:
        (actor, critic): a `ProbabilisticActor` writing ``"action"``, ``"action_log_prob"``,
        ``"logits"``, ``"harm_logits"`` and ``"value_uncertainty"``, and a `ValueOperator` writing
        ``"state_value"`` and ``"value_uncertainty"``. They share the GATv2 trunk. The config is at
        ``actor.tamiyo_config``.

    Raises:
        TamiyoError: the specs do not have the documented keys or action layout.
    """
    config = config_from_specs(observation_spec, action_spec, blueprints=blueprints, tempos=tempos, **kwargs)
    actor, critic, _ = build_tamiyo(config, action_spec)
    actor.tamiyo_config = config
    return actor, critic


def _joint_state(actor, critic) -> dict[str, torch.Tensor]:
    params = {}
    for prefix, module in (("actor", actor), ("critic", critic)):
        for k, v in module.state_dict().items():
            params[f"{prefix}.{k}"] = v
    # Shared trunk tensors appear under both prefixes: store each once.
    out, seen = {}, {}
    for k, v in params.items():
        key = (v.data_ptr(), tuple(v.shape))
        if key in seen:
            continue
        seen[key] = k
        out[k] = v.detach().to("cpu", copy=True).contiguous()  # files hold CPU tensors, from any device
    return out


def save_tamiyo(path: str | os.PathLike, actor, critic, *, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write Tamiyo's weights and config to one safetensors file (atomically: temp file + rename).

    Args:
        path: the ``.safetensors`` file to write.
        actor, critic: from `make_tamiyo` / `load_tamiyo`.
        metadata: JSON-serialisable extras (training command, seed, ...), stored in the header.

    Returns:
        The path written.
    """
    config: TamiyoConfig = actor.tamiyo_config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT, "config": config.model_dump_json(), "metadata": json.dumps(dict(metadata or {}))}
    tmp = path.with_name(f".{path.name}.tmp")
    safetensors.torch.save_file(_joint_state(actor, critic), str(tmp), metadata=header)
    os.replace(tmp, path)
    return path


def load_tamiyo(path: str | os.PathLike, action_spec=None, **overrides):
    """Rebuild Tamiyo from a file written by `save_tamiyo`.

    Args:
        path: the ``.safetensors`` file.
        action_spec: the env's action spec to attach to the actor (optional).
        overrides: decision-time `TamiyoConfig` fields to change (``safety_bias``,
            ``uncertainty_bias``).

    Returns:
        (actor, critic, metadata).

    Raises:
        TamiyoError: the file is not a Tamiyo checkpoint, or an override names an architecture field.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Tamiyo weights at {path}.")
    with safetensors.safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if header.get("format") != FORMAT:
        raise TamiyoError(f"{path} is not a Tamiyo weights file (format {header.get('format')!r}, expected {FORMAT!r}).")
    bad = set(overrides) - {"safety_bias", "uncertainty_bias"}
    if bad:
        raise TamiyoError(f"only safety_bias and uncertainty_bias can be overridden at load time, not {sorted(bad)}.")
    try:
        config = TamiyoConfig.model_validate_json(header["config"])
    except ValueError as e:  # pydantic's ValidationError and JSON errors are ValueErrors
        raise TamiyoError(f"{path}: invalid Tamiyo config in the header: {e}") from None
    config = config.model_copy(update=overrides)
    actor, critic = rebuild_tamiyo(config, tensors, where=str(path), action_spec=action_spec)
    return actor, critic, json.loads(header.get("metadata", "{}"))


def rebuild_tamiyo(config: TamiyoConfig, tensors: Mapping[str, torch.Tensor], *, where: str, action_spec=None):
    """(actor, critic) of `config` holding `tensors` (the keys `tamiyo_tensors` writes).

    Raises:
        TamiyoError: a tensor is missing or has another shape than `config`'s network.
    """
    actor, critic, _ = build_tamiyo(config, action_spec)
    actor.tamiyo_config = config
    load_into(actor, critic, tensors, where=where)
    return actor, critic


def load_into(actor, critic, tensors: Mapping[str, torch.Tensor], *, where: str = "checkpoint") -> None:
    """Copy tensors saved by `save_tamiyo` (or `tamiyo_tensors`) into an actor and critic."""
    for prefix, module in (("actor", actor), ("critic", critic)):
        own = module.state_dict()
        for k in own:
            key = f"{prefix}.{k}"
            if key not in tensors:  # shared with the actor: stored once, under "actor."
                continue
            if tensors[key].shape != own[k].shape:
                raise TamiyoError(f"{where}: {key} has shape {tuple(tensors[key].shape)}, the network expects "
                                  f"{tuple(own[k].shape)}.")
        state = {k: tensors[f"{prefix}.{k}"] for k in own if f"{prefix}.{k}" in tensors}
        missing = [k for k in own if f"{prefix}.{k}" not in tensors and not _shared(k, actor, critic)]
        if missing:
            raise TamiyoError(f"{where}: missing weights {missing[:5]}.")
        module.load_state_dict(state, strict=False)


def _shared(key: str, actor, critic) -> bool:
    a = {v.data_ptr() for v in actor.state_dict().values()}
    return critic.state_dict()[key].data_ptr() in a if key in critic.state_dict() else False


def tamiyo_tensors(actor, critic) -> dict[str, torch.Tensor]:
    """The weights as a flat mapping (the same keys `save_tamiyo` writes)."""
    return _joint_state(actor, critic)


def tamiyo_parameters(actor, critic) -> list[torch.nn.Parameter]:
    """Every trainable parameter of actor and critic, each once (the trunk is shared)."""
    seen, out = set(), []
    for p in list(actor.parameters()) + list(critic.parameters()):
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out



class DeferringPolicy(torch.nn.Module):
    """Tamiyo that defers to a fallback policy where its value ensemble is unsure.

    Each row takes Tamiyo's action unless the ensemble's spread (``"value_uncertainty"``, the
    standard deviation of the critic heads) exceeds `threshold`; then it takes the fallback's action
    (e.g. a\\*, the benchmark's best fixed policy). The threshold is calibrated on the instances
    Tamiyo trained on (e.g. the largest spread seen there), so the deferral fires where the
    observation is unlike anything in training. ``"deferred"`` [*B] says which rows deferred.

    Args:
        actor: Tamiyo's actor (`load_tamiyo`, `tamiyo_policy`).
        fallback: any policy writing ``"action"`` (a baseline, a recipe's `ControllerPolicy`).
        threshold: the spread above which a row defers (>= 0).
    """

    def __init__(self, actor, fallback, threshold: float):
        super().__init__()
        if not threshold >= 0:
            raise TamiyoError(f"DeferringPolicy: threshold must be >= 0, got {threshold!r}.")
        self.actor, self.fallback, self.threshold = actor, fallback, float(threshold)
        self.tamiyo_config = actor.tamiyo_config

    def forward(self, td):
        mine = self.actor(td.clone())
        unsure = mine["value_uncertainty"].reshape(mine["action"].shape) > self.threshold
        action = mine["action"]
        if bool(unsure.any()):
            action = torch.where(unsure, self.fallback(td.clone())["action"].to(action.device), action)
        td.set("action", action)
        td.set("value_uncertainty", mine["value_uncertainty"])
        td.set("deferred", unsure)
        return td


class ResolvingPolicy(torch.nn.Module):
    """Tamiyo that finishes what it starts before the horizon: no seed is left on trial at the end.

    A decision-time rule over the actor's choice, per row, from the observation's ``"controller"``
    view (epoch, epoch budget, slot stages) and ``"action_mask"``:

    1. a germination whose seed cannot reach its verdict before the last decision (TRAINING for
       ``max(gates.min_training_epochs, 1)`` epochs, then BLENDING for its tempo, then HOLDING,
       where FOSSILIZE or PRUNE is decided) is replaced by the actor's best other legal action
       (the highest logit among the legal actions that are not such germinations);
    2. when the decisions left (this one included) are no more than the seeds on trial, one of
       them is resolved now, as the lifecycle gates judge it: FOSSILIZE where the gate allows it
       (its measured contribution is significantly above zero), else PRUNE where a verdict is due.

    Without the rule, a seed still on trial at the horizon stays in the final network unjudged (its
    parameters count, its help was never established). With it, every seed germinated under the
    rule reaches its verdict before the horizon, and is resolved there as far as one action per
    epoch allows. ``"resolved"`` [*B] says which rows the rule
    changed.

    Args:
        actor: Tamiyo's actor (`load_tamiyo`, `tamiyo_policy`), writing ``"action"`` and ``"logits"``.
        space: the env's action space (`esper_fn.actions.ActionSpace`).
        gates: the lifecycle gates the env (or run) uses; their ``min_training_epochs`` sets how long
            a seed incubates.
        keep_helping: in (2), prune only seeds whose measured contribution is not above zero
            (``"controller"``/``"contribution"``): a seed that helps without the gate's confidence
            stays on trial.
        block_late: apply (1); False leaves germinations alone and keeps (2) only.

    Measured on growthbench-v1's train split (docs/tamiyo.md, "Finishing what it starts"): every
    variant cost validation accuracy against the shipped policy alone, so Tamiyo does not use it by
    default.
    """

    def __init__(self, actor, space: ActionSpace, gates, *, keep_helping: bool = False, block_late: bool = True):
        super().__init__()
        self.actor, self.space = actor, space
        self.keep_helping, self.block_late = bool(keep_helping), bool(block_late)
        self.incubation = max(int(gates.min_training_epochs), 1)
        self.tamiyo_config = actor.tamiyo_config
        sp, S = space, space.num_slots
        B, T = len(sp.blueprints), len(sp.tempos)
        # epochs from a germination decision to its verdict, per action (0 for non-germinations)
        need = torch.zeros(sp.n, dtype=torch.int64)
        for i in range(1, 1 + S * B * T):
            need[i] = self.incubation + sp.decode(i).tempo + 1
        self.register_buffer("need", need, persistent=False)

    def forward(self, td):
        from esper_fn import LIVE_STAGES, Op

        out = self.actor(td.clone())
        action = out["action"].clone()
        c, mask = td["controller"], td["action_mask"]
        lead = action.shape
        epoch, last = c["epoch"].reshape(-1), c["max_epochs"].reshape(-1) - 1
        stage = c["stage"].reshape(epoch.shape[0], -1)
        flat_mask, flat_action = mask.reshape(-1, mask.shape[-1]), action.reshape(-1)
        logits = out["logits"].reshape(-1, mask.shape[-1])
        live_stages = torch.tensor(sorted(int(s) for s in LIVE_STAGES), device=stage.device)
        helping = c["contribution"].reshape(stage.shape) > 0  # NaN (unmeasured) is not helping
        need = self.need.to(epoch.device)
        fos_base, pru_base = self.space.op_base(Op.FOSSILIZE), self.space.op_base(Op.PRUNE)
        changed = torch.zeros_like(flat_action, dtype=torch.bool)
        for i in range(flat_action.shape[0]):
            live = torch.isin(stage[i], live_stages)
            n_live = int(live.sum())
            slots = [s for s in range(stage.shape[1]) if live[s]]
            fos = [s for s in slots if flat_mask[i, fos_base + s]]
            pru = [s for s in slots if flat_mask[i, pru_base + s] and not (self.keep_helping and helping[i, s])]
            if n_live and n_live >= int(last[i] - epoch[i]) + 1 and (fos or pru):  # no more decisions than trials
                new = fos_base + fos[0] if fos else pru_base + pru[0]
            else:
                allowed = flat_mask[i] & ~((need > 0) & (epoch[i] + need > last[i])) if self.block_late else flat_mask[i]
                if allowed[int(flat_action[i])]:
                    continue
                new = int(logits[i].masked_fill(~allowed, float("-inf")).argmax())
            if new != int(flat_action[i]):
                flat_action[i] = new
                changed[i] = True
        td.set("action", flat_action.reshape(lead))
        td.set("resolved", changed.reshape(lead))
        if "value_uncertainty" in out.keys():
            td.set("value_uncertainty", out["value_uncertainty"])
        return td
