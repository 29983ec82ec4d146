"""A `State` as a flat map of named tensors plus JSON metadata (for safetensors checkpoints)."""

from __future__ import annotations

from typing import Any

from tensordict import TensorDict
from torch import Tensor

from ._errors import CheckpointError
from ._host import Host
from ._state import State
from .optim import Optimizer

__all__ = ["state_from_tensors", "state_to_tensors"]

_SEP = "/"


def state_to_tensors(state: State) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Flatten a state into ``{"params/host/fc1/weight": tensor, ...}`` and JSON-able metadata."""
    if state.batch:
        raise CheckpointError("state_to_tensors: unstack a stacked state first (`esper_fn.unstack`).")
    out: dict[str, Tensor] = {}
    for prefix, flat in (("params", state.params_flat), ("buffers", state.buffers_flat), ("opt", state.opt_flat)):
        for k, v in flat.items():
            if any(_SEP in part for part in k):
                raise CheckpointError(f"key {k} contains {_SEP!r}; slot and parameter names may not.")
            out[_SEP.join((prefix, *k))] = v
    for name in state.slots.keys():
        out[f"slots{_SEP}{name}"] = state.slots[name]
    meta = {
        "host": state.host.name,
        "host_config": dict(state.host.config),
        "optimizer": {"name": state.optimizer.name, "lr": dict(state.optimizer.lr),
                      "mirrors": list(state.optimizer.mirrors), "hyper": dict(state.optimizer.hyper)},
        "slot_names": list(state.slot_names),
        "blueprints": list(state.blueprints),
        "n_seeds": state.n_seeds,
        "param_keys": [list(k) for k in state.params_flat],
        "buffer_keys": [list(k) for k in state.buffers_flat],
        "opt_keys": [list(k) for k in state.opt_flat],
    }
    return out, meta


def state_from_tensors(host: Host, tensors: dict[str, Tensor], meta: dict[str, Any]) -> State:
    """Rebuild a state saved by `state_to_tensors` (key order included, so resumes are bit-exact).

    Raises:
        CheckpointError: the host or optimizer differ from the checkpoint's, or a tensor is missing.
    """
    if meta.get("host") != host.name or meta.get("host_config") != _jsonable(host.config):
        raise CheckpointError(
            f"checkpoint was written for host {meta.get('host')!r} ({meta.get('host_config')}); "
            f"restoring into {host.name!r} ({dict(host.config)}). Pass the host the run was made with."
        )
    o = meta["optimizer"]
    optimizer = Optimizer(o["name"], o["lr"], tuple(o["mirrors"]), o["hyper"])

    def take(prefix: str, keys: list[list[str]]) -> dict[tuple[str, ...], Tensor]:
        flat = {}
        for k in keys:
            name = _SEP.join((prefix, *k))
            if name not in tensors:
                raise CheckpointError(f"checkpoint lacks tensor {name!r} listed in its metadata.")
            flat[tuple(k)] = tensors[name]
        return flat

    S = len(meta["slot_names"])
    slots = TensorDict({k.split(_SEP, 1)[1]: v for k, v in tensors.items() if k.startswith("slots" + _SEP)},
                       batch_size=[S])
    return State(
        host, optimizer, take("params", meta["param_keys"]), take("buffers", meta["buffer_keys"]),
        take("opt", meta["opt_keys"]), slots, tuple(meta["slot_names"]), tuple(meta["blueprints"]), meta["n_seeds"],
    )


def _jsonable(x):
    import json

    return json.loads(json.dumps(dict(x)))

