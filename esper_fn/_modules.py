"""The building blocks of an exported network (`esper_fn.export`): standard `torch.nn` layers, and a
few small modules where no standard layer does the job.

An exported network is an ordinary `nn.Module` tree: the host's layers (`nn.Linear`, `nn.Conv1d`,
`nn.Conv2d`, `nn.LayerNorm`, ...; a wrapped host is a copy of its own module), and at every live
seed a `Graft` that holds the layer the slot follows and the seed as a submodule (itself built from
standard layers where the design is made of them; `esper_fn.SeedFn` otherwise). Every class here is
defined at module level and holds only tensors, submodules and plain values, so an export pickles,
`torch.save`s, `torch.jit.trace`s, `torch.export.export`s and can be wrapped again (`esper_fn.wrap`).

Modules are built on the "meta" device (no memory, no random draw: the global generator never
moves) and then given copies of the state's tensors with `load`, so they land on the state's device
in its dtype.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ._errors import HostError

__all__ = [
    "CompositeAttention", "Graft", "Scale", "SelfAttention", "SwiGLU", "Transpose", "TransformerBlock",
    "TransformerNet", "activation", "load", "on_meta",
]  # fmt: skip

READS = ("h", "x_in", "h,x_in")
"""What a grafted seed module is called with: the slot tensor, the input of the layer the slot follows,
or both (``seed(h, x_in)``; x_in is None on an input slot)."""


def on_meta() -> torch.device:
    """The device to build modules on before `load` fills them: ``with on_meta(): nn.Linear(...)``
    allocates nothing and draws nothing from the global random generator."""
    return torch.device("meta")


def load(module: nn.Module, tensors: Mapping[str, Tensor]) -> nn.Module:
    """Give every parameter and buffer of `module` a copy of the tensor of the same dotted name.

    Parameters shared by several submodules (tied weights) stay shared: they get one new
    `nn.Parameter`, which keeps the old one's ``requires_grad``.

    Args:
        module: built on the meta device (or any module whose tensors are to be replaced).
        tensors: ``{dotted name: tensor}`` covering every parameter and buffer of `module` (one
            name per tied group is enough).

    Returns:
        `module` (changed in place), its tensors on the given tensors' device and dtype.

    Raises:
        HostError: a parameter or buffer has no tensor, or a tensor names nothing in `module`.
    """
    groups: dict[int, list[tuple[str, bool]]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append((name, True))
    for name, b in module.named_buffers(remove_duplicate=False):
        groups.setdefault(id(b), []).append((name, False))
    known = {n for names in groups.values() for n, _ in names}
    unknown = sorted(set(tensors) - known)
    missing = [names[0][0] for names in groups.values() if not any(n in tensors for n, _ in names)]
    if unknown or missing:
        raise HostError(f"export: the module built for the state {type(module).__name__} does not match its tensors: "
                        f"no tensor for {missing}, no place for {unknown}. A host's module_fn must build the "
                        "layers its parameters describe.")
    for names in groups.values():
        given = next(n for n, _ in names if n in tensors)
        t = tensors[given].detach().clone()
        value: Tensor = t
        if names[0][1]:
            old = module.get_parameter(names[0][0])
            value = nn.Parameter(t, requires_grad=old.requires_grad and (t.is_floating_point() or t.is_complex()))
        for name, is_param in names:
            path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(path)
            (owner._parameters if is_param else owner._buffers)[leaf] = value
    return module


class Graft(nn.Module):
    """A seed grafted after a layer: ``h = layer(x); h + alpha * seed(...)`` (the slot's live output).

    Attributes:
        layer: the layer the slot follows (`nn.Identity` for an input slot).
        seed: the seed's module; what it is called with is `reads`.
        alpha: 0-d buffer, the blend weight; None for a seed at full weight (fossilized, or blended
            to alpha 1), whose delta is added as it is (``h + 1 * d`` is ``h + d`` exactly, one
            multiplication less per step).
        reads: "h" (the layer's output), "x_in" (the layer's input) or "h,x_in" (both).
        at_input: the slot is a network's input slot (a seed reading x_in gets None there).

    A layer returning a tuple (``nn.MultiheadAttention``: output and weights) gets the seed added to
    its first element. Attributes the layer has and the graft lacks (``self_attn.batch_first``, read
    by `nn.TransformerEncoder`) are read through from the layer.
    """

    def __init__(self, layer: nn.Module, seed: nn.Module, alpha: Tensor | None, reads: str = "h",
                 at_input: bool = False):
        super().__init__()
        if reads not in READS:
            raise HostError(f"Graft: reads must be one of {READS}, got {reads!r}.")
        self.layer = layer
        self.seed = seed
        self.register_buffer("alpha", alpha)
        self.reads = reads
        self.at_input = at_input

    def forward(self, *args, **kwargs):
        out = self.layer(*args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        x_in = None if self.at_input or not args else args[0]
        if self.reads == "h":
            d = self.seed(h)
        elif self.reads == "x_in":
            d = self.seed(x_in)
        else:
            d = self.seed(h, x_in)
        h = h + d if self.alpha is None else h + self.alpha * d
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    def extra_repr(self) -> str:
        a = self.alpha
        value = 1.0 if a is None else ("?" if a.device.type == "meta" else float(a))
        return f"alpha={value}, reads={self.reads!r}"

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            return getattr(nn.Module.__getattr__(self, "layer"), name)


class Scale(nn.Module):
    """``h * scale``, one learned factor per feature (the IA3 seed's delta)."""

    def __init__(self, features: int, *, device=None, dtype=None):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(features, device=device, dtype=dtype))

    def forward(self, h: Tensor) -> Tensor:
        return h * self.scale


class SwiGLU(nn.Module):
    """``down(silu(gate(h)) * up(h))`` with bias-free Linears."""

    def __init__(self, features: int, hidden: int, *, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate = nn.Linear(features, hidden, **kw)
        self.up = nn.Linear(features, hidden, **kw)
        self.down = nn.Linear(hidden, features, **kw)
        self.act = nn.SiLU()

    def forward(self, h: Tensor) -> Tensor:
        return self.down(self.act(self.gate(h)) * self.up(h))


class Transpose(nn.Module):
    """``x.transpose(dim0, dim1)``: a series [B, length, channels] read channels-first."""

    def __init__(self, dim0: int, dim1: int):
        super().__init__()
        self.dim0, self.dim1 = dim0, dim1

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(self.dim0, self.dim1)

    def extra_repr(self) -> str:
        return f"{self.dim0}, {self.dim1}"


class CompositeAttention(nn.Module):
    """Runs `net` with PyTorch's fused multi-head-attention "fast path" off, as the functional
    forward of a wrapped host does: the fused eval-mode kernel reads a `nn.MultiheadAttention`'s
    weights directly, which would skip a seed grafted on it, and rounds differently from the
    composite path. The setting is restored after the call."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *args, **kwargs):
        enabled = torch.backends.mha.get_fastpath_enabled()
        if enabled:
            torch.backends.mha.set_fastpath_enabled(False)
        try:
            return self.net(*args, **kwargs)
        finally:
            if enabled:
                torch.backends.mha.set_fastpath_enabled(True)


class SelfAttention(nn.Module):
    """Multi-head self-attention written out (softmax(q k^T / sqrt(hd)) v), with a fused input
    projection ``in_proj`` (q, k, v) and an output projection ``out_proj``: the built-in
    transformer host's attention, operation for operation."""

    def __init__(self, d_model: int, n_heads: int, *, device=None, dtype=None):
        super().__init__()
        self.n_heads = n_heads
        self.in_proj = nn.Linear(d_model, 3 * d_model, device=device, dtype=dtype)
        self.out_proj = nn.Linear(d_model, d_model, device=device, dtype=dtype)

    def forward(self, a: Tensor) -> Tensor:
        d = a.shape[-1]
        q, k, v = self.in_proj(a).unflatten(-1, (3, self.n_heads, d // self.n_heads)).unbind(-3)
        q, k, v = q.transpose(-2, -3), k.transpose(-2, -3), v.transpose(-2, -3)  # [..., H, T, hd]
        att = torch.softmax(q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5), dim=-1) @ v
        return self.out_proj(att.transpose(-2, -3).flatten(-2))

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}"


class TransformerBlock(nn.Module):
    """A pre-norm transformer block: ``h + attn(ln1(h))``, then ``+ mlp(ln2(.))`` (GELU MLP)."""

    def __init__(self, d_model: int, n_heads: int, hidden: int, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.ln1 = nn.LayerNorm(d_model, **kw)
        self.attn = SelfAttention(d_model, n_heads, **kw)
        self.ln2 = nn.LayerNorm(d_model, **kw)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(d_model, hidden, **kw), act=nn.GELU(),
                                             fc2=nn.Linear(hidden, d_model, **kw)))

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class TransformerNet(nn.Module):
    """The built-in transformer host as a module: embedding (`nn.Embedding` for tokens, else a
    `nn.Linear` per time step) plus learned positions ``pos``, an ``input`` slot point
    (`nn.Identity`), the blocks, a final `nn.LayerNorm`, mean pooling over time, a `nn.Linear` head."""

    def __init__(self, embed: nn.Module, seq_len: int, d_model: int, blocks: list[nn.Module], n_classes: int, *,
                 device=None, dtype=None):
        super().__init__()
        self.embed = embed
        self.pos = nn.Parameter(torch.zeros(seq_len, d_model, device=device, dtype=dtype))
        self.input = nn.Identity()
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(d_model, device=device, dtype=dtype)
        self.head = nn.Linear(d_model, n_classes, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(self.embed, nn.Embedding) and x.dim() == 2:
            x = x.unsqueeze(-1)  # [B, T] real values: one feature per step
        h = self.input(self.embed(x) + self.pos)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h).mean(-2))


def activation(name: str) -> nn.Module:
    """The `nn` module of an activation named in `esper_fn._host.ACTIVATIONS` (the same function)."""
    return {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}[name]()

