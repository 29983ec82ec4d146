"""Export a grown network as an ordinary `nn.Module` built from standard layers.

`export(state)` builds the host as the module its `Host.module_fn` describes (the built-in hosts as
`nn.Sequential` stacks of `nn.Linear` / `nn.Conv1d` / `nn.Conv2d` and activations, or the
transformer's `TransformerNet`; a wrapped host as a copy of its own module) and grafts every live
seed (BLENDING with alpha > 0, HOLDING, FOSSILIZED) after the layer its slot follows, as a `Graft`
holding the layer and the seed's module. Everything is copied: training the export leaves the state
alone. The result prints its layers, pickles, `torch.save`s, `torch.jit.trace`s,
`torch.export.export`s, and `esper_fn.wrap` takes it again to keep growing.

Outputs equal ``esper_fn.apply(state, x)``:

* exactly (the same operations on the same values) for the built-in hosts and wrapped modules with
  seeds whose modules are standard layers (residual MLP and SwiGLU, LoRA, IA3, the Conv1d and Conv2d
  blocks) or generic `SeedFn` modules (attention, RMSNorm, mixtures of experts, taps: they call the
  blueprint's own ``apply``); a wrapped module containing `nn.MultiheadAttention` runs inside a
  `CompositeAttention`, which keeps PyTorch's fused fast path off, as the functional forward does;
* within float rounding for a live width-growth seed (Net2Net): the export folds its units into the
  two Linears at the seed's current alpha (the merge `fossilize` does), so the consumer sums over
  one wider matrix instead of adding the seed's output.

A hand-made `Host` without a ``module_fn`` exports as a `GrownNetwork`: a module that runs the
host's functional forward (not picklable: it holds the host's functions).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from . import _blueprint as bpm
from . import _modules as M
from ._apply import make_plan, make_slot_fn
from ._errors import GraftError
from ._state import State, check_not_donated

__all__ = ["GrownNetwork", "SeedFn", "export"]


class SeedFn(nn.Module):
    """A seed whose design is not made of standard layers (attention seeds, mixtures of experts,
    RMSNorm, taps, ...): its tensors as parameters and buffers, its forward the registered
    blueprint's ``apply`` (looked up by id, so the blueprint must be registered in the process that
    loads a pickled export: the built-in catalogue always is).

    Buffers a training forward updates (an activation tap's statistics, a router's balance) are
    updated in place in train mode, as BatchNorm's are; an auxiliary loss is not returned.
    """

    def __init__(self, blueprint: str, spec, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]):
        super().__init__()
        self.blueprint = blueprint
        self.spec = spec
        self.param_names = tuple(params)
        for k, v in params.items():
            self.register_parameter(k, nn.Parameter(v.detach().clone()))
        for k, v in buffers.items():
            self.register_buffer(k, v.detach().clone())

    def forward(self, h: Tensor, x_in: Tensor | None = None) -> Tensor:
        tensors = dict(self.named_parameters(recurse=False))
        tensors.update(self.named_buffers(recurse=False))
        out = bpm.registry()[self.blueprint].apply(tensors, h, x_in, self.spec, self.training)
        if isinstance(out, bpm.SeedOut):
            if self.training and out.buffers:
                with torch.no_grad():
                    for k, v in out.buffers.items():
                        self.get_buffer(k).copy_(v)
            out = out.delta
        return out

    def extra_repr(self) -> str:
        return f"blueprint={self.blueprint!r}, slot={self.spec.name!r}"


def _tree(flat: dict[tuple[str, ...], Tensor], as_param: bool) -> nn.Module:
    root = nn.Module()
    for key, v in flat.items():
        mod = root
        for part in key[:-1]:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        if as_param:
            mod.register_parameter(key[-1], nn.Parameter(v.detach().clone()))
        else:
            mod.register_buffer(key[-1], v.detach().clone())
    return root


class GrownNetwork(nn.Module):
    """A grown network over a hand-made `Host` (one without ``module_fn``): parameters under
    ``host.*`` and ``seeds.<slot>.*``, blend weights in the ``alpha`` buffer, and a forward that runs
    the host's functional forward with the live seeds attached, so ``GrownNetwork(state)(x) ==
    esper_fn.apply(state, x)``. Train it with `torch.optim`, save it with `state_dict` (it holds the
    host's functions, so it does not pickle: give the host a ``module_fn`` for that).
    """

    def __init__(self, state: State):
        super().__init__()
        if state.batch:
            raise GraftError(f"export: the state is stacked over {state.batch}; export one host "
                             "at a time (`esper_fn.unstack(state)`).")
        plan = make_plan(state)
        self._host_def = state.host
        self._entries = dict(plan.live)
        self.host = _tree({k[1:]: v for k, v in state.params_flat.items() if k[0] == "host"}, True)
        for k, v in state.buffers_flat.items():
            if k[0] == "host":
                self._module_at(self.host, k[1:-1]).register_buffer(k[-1], v.detach().clone())
        self.seeds = _tree({k[1:]: v for k, v in state.params_flat.items()
                            if k[0] == "seeds" and k[1] in self._entries}, True)
        for k, v in state.buffers_flat.items():
            if k[0] == "seeds" and k[1] in self._entries:
                self._module_at(self.seeds, k[1:-1]).register_buffer(k[-1], v.detach().clone())
        self.register_buffer("alpha", state.slots["alpha"].detach().clone().to(state.device))

    @staticmethod
    def _module_at(root: nn.Module, path: tuple[str, ...]) -> nn.Module:
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        return mod

    def forward(self, x: Tensor) -> Tensor:
        flat = dict(self.host.named_parameters())
        flat.update(self.host.named_buffers())
        seeds = {}
        for slot in self._entries:
            m = getattr(self.seeds, slot, None)  # absent for seeds without parameters or buffers
            d = {} if m is None else dict(m.named_parameters())
            if m is not None:
                d.update(m.named_buffers())
            seeds[slot] = d
        alphas = {slot: self.alpha[i] for slot, (_, _, i) in self._entries.items()}
        aux: list[Tensor] = []
        seed_buffers: dict = {}
        slot_fn = make_slot_fn(self._entries, seeds, alphas, self.training, aux, seed_buffers)
        y, new_buffers = self._host_def.forward_fn(flat, x, slot_fn, self.training)
        with torch.no_grad():
            for n, v in new_buffers.items():
                self.host.get_buffer(n).copy_(v)
            for slot, d in seed_buffers.items():
                for n, v in d.items():
                    getattr(self.seeds, slot).get_buffer(n).copy_(v)
        return y


def export(state: State) -> nn.Module:
    """The grown network of `state` as an ordinary `nn.Module` (in eval mode, on the state's device,
    in its dtype) whose outputs equal ``esper_fn.apply(state, x)`` (see the module docstring for
    where exactly and where within float rounding).

    The host's layers are standard modules and each live seed is a `Graft` after the layer its slot
    follows (`Graft.layer`, `Graft.seed`, blend weight `Graft.alpha`); seeds that are not live
    (GERMINATED, TRAINING) are left out, as the live forward leaves them out. Parameters are copies,
    so training the export leaves `state` alone; train it with `torch.optim`, pickle it, trace it,
    or `esper_fn.wrap` it again to keep growing.

    Args:
        state: a single (unstacked) state.

    Returns:
        The module (a `GrownNetwork` for a hand-made `Host` without ``module_fn``).

    Raises:
        GraftError: the state is stacked; or a live width-growth seed cannot be folded because the
            seed at its consumer's slot reads the consumer's input (fossilize or prune one first).
        DonatedStateError: the state was donated to a `train_step`.
    """
    if state.batch:
        raise GraftError(f"export: the state is stacked over {state.batch}; export one host "
                         "at a time (`esper_fn.unstack(state)`).")
    check_not_donated(state, "export")
    host = state.host
    if host.module_fn is None:
        return GrownNetwork(state).eval()
    plan = make_plan(state)
    alpha = state.slots["alpha"].to(state.device)
    flat = {".".join(k[1:]): v for k, v in state.params_flat.items() if k[0] == "host"}
    flat.update({".".join(k[1:]): v for k, v in state.buffers_flat.items() if k[0] == "host"})
    grafts = {}
    for slot, (bp, spec, i) in plan.live.items():
        seed = _seed_tensors(state, slot)
        if bp.meta.target == "consumer":  # width growth: its units become rows and columns of two Linears
            _check_foldable(state, slot, bp)
            flat.update(bp.merge(flat, seed, spec, alpha[i]))
        else:
            full = float(state.slots["alpha"][i]) == 1.0  # the CPU record: no device read
            grafts[slot] = (bp, spec, seed, None if full else alpha[i].detach().clone())
    module, paths = host.module_fn(flat)
    for slot, (bp, spec, seed, a) in grafts.items():
        if bp.module is not None:
            seed_module, reads = bp.module(spec, seed)
        else:
            params = {k[2]: v for k, v in state.params_flat.items() if k[:2] == ("seeds", slot)}
            buffers = {k[2]: v for k, v in state.buffers_flat.items() if k[:2] == ("seeds", slot)}
            seed_module, reads = SeedFn(bp.id, spec, params, buffers), "h,x_in"
        path = paths[slot]
        if path == "":  # a slot on the input, read before the module's own forward
            graft = M.Graft(nn.Identity(), seed_module, a, reads, at_input=True)
            module = nn.Sequential(OrderedDict(input=graft, net=module))
            paths = {k: (f"net.{v}" if v else "") for k, v in paths.items()}
            continue
        parent_path, _, name = path.rpartition(".")
        parent = module.get_submodule(parent_path)
        layer = parent.get_submodule(name)
        graft = M.Graft(layer, seed_module, a, reads, at_input=slot == "input")
        parent.register_module(name, graft)
    return module.eval()


def _seed_tensors(state: State, slot: str) -> dict[str, Tensor]:
    out = {k[2]: v for k, v in state.params_flat.items() if k[:2] == ("seeds", slot)}
    out.update({k[2]: v for k, v in state.buffers_flat.items() if k[:2] == ("seeds", slot)})
    return out


def _check_foldable(state: State, slot: str, bp: bpm.Blueprint) -> None:
    consumer = state.spec(slot).consumer
    other = state.blueprints[state.index(consumer)] if consumer is not None else None
    if other is None or state.stage(consumer).name not in ("BLENDING", "HOLDING", "FOSSILIZED"):
        return
    if bpm.registry()[other].meta.layer_types is not None:
        raise GraftError(
            f"export: slot {slot!r} holds a live width-growth seed {bp.id!r}, which the export folds into layer "
            f"{consumer!r} (widening its input), and slot {consumer!r} holds {other!r}, which reads that layer's "
            f"input at its old width. Fossilize or prune one of the two seeds before exporting."
        )
