"""Export a grown network as a plain `nn.Module`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._apply import make_slot_fn, make_plan
from ._errors import GraftError
from ._state import State

__all__ = ["GrownNetwork", "export"]


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
    """The grown network as an ordinary module: parameters under ``host.*`` and ``seeds.<slot>.*``,
    blend weights in the ``alpha`` buffer. Train it with `torch.optim`, save it with `state_dict`.

    Its forward runs the host's forward with the live seeds (BLENDING, HOLDING, FOSSILIZED) attached,
    so ``GrownNetwork(state)(x) == esper_fn.apply(state, x)``.
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
        self.register_buffer("alpha", state.slots["alpha"].detach().clone())

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


def export(state: State) -> GrownNetwork:
    """The grown network of `state` as a plain `nn.Module` (in eval mode) with the same outputs as
    ``esper_fn.apply(state, x)``. Parameters are copied: training the export leaves `state` alone."""
    return GrownNetwork(state).eval()
