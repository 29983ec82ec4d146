"""Hosts: networks with named seed slots, as pure functions over a flat map of parameter tensors.

A `Host` is a static description: how to initialise its parameters, how to run its forward pass
given parameters and a *slot function*, and where its slots are. The forward pass calls
``slot(name, h, x_in)`` at every slot point; the slot function returns ``h`` unchanged for a dormant
slot (a dict lookup, nothing computed) or ``h + alpha * seed(h)`` for a live one.

Built-in hosts (`mlp`, `cnn1d`, `cnn2d`, `transformer`) are written directly with `torch.nn.functional`;
`wrap(module, example_input, slots=...)` turns any `nn.Module` into a host through forward hooks on
a private copy of the module and `torch.func.functional_call`.
"""

from __future__ import annotations

import copy
import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor, nn

from . import _modules as M
from ._errors import HostError

__all__ = [
    "Host", "SlotSpec", "SlotFn", "mlp", "cnn1d", "cnn2d", "transformer", "wrap", "hosts", "preset",
    "mlp_width_preset", "cnn1d_width_preset", "cnn2d_width_preset",
]  # fmt: skip

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "silu": F.silu,
}


class SlotFn(Protocol):
    def __call__(self, name: str, h: Tensor, x_in: Tensor | None = None) -> Tensor: ...


def identity_slot(name: str, h: Tensor, x_in: Tensor | None = None) -> Tensor:
    """The slot function of a host with no seeds: every slot passes its tensor through."""
    return h


@dataclass(frozen=True)
class SlotSpec:
    """Where a seed can attach, and what it sees there.

    Attributes:
        name: slot name (a key of ``params["seeds"]``).
        kind: layout of the slot tensor: "vector" ([B, d]), "conv1d" ([B, C, L]), "conv2d"
            ([B, C, H, W]) or "sequence" ([B, T, d]).
        shape: per-sample shape of the slot tensor (without the batch dimension).
        layer: path of the layer whose output the slot follows (its parameters are
            ``params["host", *layer.split("."), "weight"]``), or None for the input slot.
        layer_type: "linear", "conv1d", "conv2d", "attention", "block", "norm" or None.
        in_shape: per-sample shape of that layer's input, or None.
        consumer: name of the slot after the Linear that reads this slot's tensor through an
            elementwise ``activation``; set where Net2Net-style width growth applies, else None.
        consumer_layer: path of that consumer Linear.
        consumer_out: output features of that consumer Linear.
        activation: name of that activation (a key of `ACTIVATIONS`), or None.
        dtype: dtype of the slot tensor. Seeds add a floating-point delta, so only slots with a
            floating-point dtype can hold one (an "input" slot on integer tokens cannot).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    layer: str | None = None
    layer_type: str | None = None
    in_shape: tuple[int, ...] | None = None
    consumer: str | None = None
    consumer_layer: str | None = None
    consumer_out: int | None = None
    activation: str | None = None
    dtype: torch.dtype = torch.float32

    @property
    def features(self) -> int:
        """Size of the feature (vector, sequence) or channel (conv) dimension."""
        if self.kind in ("vector", "sequence"):
            return self.shape[-1]
        return self.shape[0]


ForwardFn = Callable[[Mapping[str, Tensor], Tensor, SlotFn, bool], tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True, eq=False)
class Host:
    """A network with named slots, as pure functions.

    Attributes:
        name: a readable identifier (e.g. "mlp-40-16-10").
        init_fn: ``init_fn(generator) -> (params, buffers)``: two flat dicts of tensors keyed by
            dotted module paths ("fc1.weight").
        forward_fn: ``forward_fn(flat, x, slot, train) -> (y, new_buffers)`` where ``flat`` maps
            dotted names to parameters *and* buffers; ``new_buffers`` holds the buffers a training
            forward updated (empty for hosts without running statistics).
        slots_fn: ``slots_fn(shapes) -> tuple[SlotSpec, ...]`` from a map of parameter name to
            shape (slot shapes follow the parameters, so width growth changes them).
        config: the constructor arguments, recorded in checkpoints and exports.
        input_shapes: the per-sample shapes (without the batch dimension) the forward accepts, e.g.
            ``((40,),)``; `check_input` holds every batch to them. None: not checked.
        input_dtypes: the dtypes the forward accepts (e.g. ``(torch.float32,)``); None: not checked.
        module_fn: ``module_fn(flat) -> (module, paths)``: the host as an ordinary `nn.Module` built
            from standard layers and holding copies of `flat` (dotted names to parameters and
            buffers, as `forward_fn` takes them), whose forward equals `forward_fn` with no seeds;
            ``paths`` maps every slot name to the submodule the slot follows ("" for an input slot
            read before the module's own forward). `esper_fn.export` grafts the live seeds there.
            None (a hand-made `Host`): `export` returns a functional `GrownNetwork` instead.
    """

    name: str
    init_fn: Callable[[torch.Generator | None], tuple[dict[str, Tensor], dict[str, Tensor]]]
    forward_fn: ForwardFn
    slots_fn: Callable[[Mapping[str, tuple[int, ...]]], tuple[SlotSpec, ...]]
    config: Mapping[str, Any] = field(default_factory=dict)
    _slot_cache: dict = field(default_factory=dict, repr=False)
    _plan_cache: dict = field(default_factory=dict, repr=False)  # esper_fn._apply's per-structure plans
    input_shapes: tuple[tuple[int, ...], ...] | None = None
    input_dtypes: tuple[torch.dtype, ...] | None = None
    module_fn: Callable[[Mapping[str, Tensor]], tuple[nn.Module, Mapping[str, str]]] | None = None

    def init_like(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Parameters and buffers with the keys, shapes and dtypes of a fresh init (values are
        unspecified), for shape queries: nothing is drawn from the global random generator, and a
        wrapped module is not re-initialised."""
        _SHAPE_PROBE.manual_seed(0)
        return self.init_fn(_SHAPE_PROBE)

    def check_input(self, x: Tensor, batch_dims: int = 1, float_dtype: torch.dtype | None = None) -> None:
        """Raise `HostError` unless `x` is a batch the host's forward accepts.

        Args:
            x: the input, ``[*batch, *sample_shape]``.
            batch_dims: leading dimensions before the sample shape: 1 (``[B, ...]``), or 2 for a
                state stacked over N hosts (``[N, B, ...]``).
            float_dtype: for a host that takes floating-point input, the dtype it must have (that of
                the state's parameters, which may have been cast, e.g. to float64); default: the
                host's declared `input_dtypes`.

        Raises:
            HostError: `x` is not a tensor, or its per-sample shape or dtype is not one the host
                takes (naming the expected and the given shape or dtype, and the fix).
        """
        if not isinstance(x, Tensor):
            raise HostError(f"host {self.name!r}: the input must be a torch.Tensor batch, got {type(x).__name__}.")
        lead = "[N, B, " if batch_dims == 2 else "[B, "
        fmt = lambda shape: lead + ", ".join(map(str, shape)) + "]"  # noqa: E731
        if self.input_shapes is not None and (
            x.dim() < batch_dims or tuple(x.shape[batch_dims:]) not in self.input_shapes
        ):
            want = " or ".join(fmt(s) for s in self.input_shapes)
            raise HostError(f"host {self.name!r} takes batches of shape {want}; got {list(x.shape)}. "
                            f"{self._shape_hint(x, batch_dims)}.")
        dtypes = self.input_dtypes
        if dtypes is not None and float_dtype is not None and all(d.is_floating_point for d in dtypes):
            dtypes = (float_dtype,)
        if dtypes is not None and x.dtype not in dtypes:
            want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
            conv = {torch.float32: ".float()", torch.float64: ".double()", torch.int64: ".long()",
                    torch.float16: ".half()", torch.bfloat16: ".bfloat16()"}.get(dtypes[0], ".to(dtype)")
            what = ("the state's parameters are " + str(dtypes[0]).removeprefix("torch.") if dtypes[0].is_floating_point
                    else "the host reads token ids")
            raise HostError(f"host {self.name!r} takes {want} input, got {str(x.dtype).removeprefix('torch.')}; "
                            f"convert the batch with `x{conv}` ({what}).")

    def _shape_hint(self, x: Tensor, batch_dims: int) -> str:
        """How to turn `x` into a batch the host takes, for `check_input`'s message."""
        sample = self.input_shapes[0]
        if batch_dims == 1 and tuple(x.shape) in self.input_shapes:
            return "One sample needs its batch dimension: pass `x[None]` (i.e. `x.unsqueeze(0)`)"
        if x.dim() >= batch_dims and math.prod(x.shape[batch_dims:]) == math.prod(sample):
            lead = "N, B" if batch_dims == 2 else "B"
            return f"Reshape it: `x.reshape({lead}, {', '.join(map(str, sample))})`"
        if batch_dims == 2 and tuple(x.shape[1:]) in self.input_shapes:
            return "A stacked state takes one batch per host: expand a shared one with `x.expand(N, *x.shape)`"
        return "Pass batches of the samples the host was built for"

    def slots(self, params: TensorDict | Mapping[str, Tensor] | None = None) -> tuple[SlotSpec, ...]:
        """Slot specs for the given host parameters (default: the freshly initialised shapes).

        Args:
            params: a host parameter TensorDict (``state.params["host"]``), or a flat mapping of
                dotted names to tensors or to shapes.
        """
        if params is None:
            params = self.init_like()[0]
        if isinstance(params, TensorDict):
            shapes = {".".join(k): tuple(v.shape) for k, v in params.items(True, True)}
        else:
            shapes = {k: tuple(v) if isinstance(v, tuple) else tuple(v.shape) for k, v in params.items()}
        key = tuple(sorted(shapes.items()))
        specs = self._slot_cache.get(key)
        if specs is None:
            specs = self.slots_fn(shapes)
            self._slot_cache[key] = specs
        return specs

    def slot(self, name: str, params: TensorDict | Mapping[str, Tensor] | None = None) -> SlotSpec:
        """The spec of slot `name`; raises `HostError` listing the valid names if unknown."""
        for s in self.slots(params):
            if s.name == name:
                return s
        raise HostError(
            f"host {self.name!r} has no slot {name!r}; its slots are "
            f"{[s.name for s in self.slots(params)]}."
        )


_SHAPE_PROBE = torch.Generator()
"""The generator `Host.init_like` passes to ``init_fn``: shape queries, not initialisation."""


def _uniform(shape: Sequence[int], bound: float, g: torch.Generator | None) -> Tensor:
    return (torch.rand(*shape, generator=g) * 2 - 1) * bound


def _linear_init(out_f: int, in_f: int, g: torch.Generator | None) -> tuple[Tensor, Tensor]:
    # Same distribution as nn.Linear's default (kaiming_uniform with a=sqrt(5)).
    bound = 1 / math.sqrt(in_f)
    return _uniform((out_f, in_f), bound, g), _uniform((out_f,), bound, g)


def _conv_init(out_c: int, in_c: int, k: int, g: torch.Generator | None) -> tuple[Tensor, Tensor]:
    bound = 1 / math.sqrt(in_c * k)
    return _uniform((out_c, in_c, k), bound, g), _uniform((out_c,), bound, g)


# --- MLP ---------------------------------------------------------------------------------------


def mlp(
    widths: Sequence[int] = (40, 16, 10),
    activation: str = "relu",
    name: str | None = None,
    *,
    input_shape: Sequence[int] | None = None,
) -> Host:
    """A multi-layer perceptron host: Linear layers ``fc1..fcL`` with `activation` between them.

    Slots: "input" on the raw sample, and "fc<i>" after every Linear (pre-activation; the last
    one is the logits). Hidden slots declare their consumer, so width growth applies there.

    Samples are flat vectors [features] by default. With a multi-dimensional `input_shape` the
    MLP reads the raw sample and flattens it after the "input" slot, so a convolutional seed can
    attach on the raw signal or image: a series [length, channels] (time first) is viewed
    channels-first, [channels, length], at a "conv1d" input slot and flattened channel by channel;
    an image [channels, height, width] has a "conv2d" input slot.

    Args:
        widths: layer widths including input and output, e.g. (40, 16, 10) (826 parameters);
            ``widths[0]`` is the number of elements of one sample.
        activation: one of "relu", "gelu", "tanh", "silu".
        input_shape: the shape of one sample when it is not a flat vector: (length, channels) or
            (channels, height, width); None (or ``(widths[0],)``) for flat vectors.

    Raises:
        HostError: widths that are not >= 2 positive ints, an unknown activation, or an
            `input_shape` of another rank or whose element count is not ``widths[0]``.
    """
    widths = tuple(int(w) for w in widths)
    if len(widths) < 2 or min(widths) < 1:
        raise HostError(f"mlp widths must be >= 2 positive ints, got {widths}.")
    if activation not in ACTIVATIONS:
        raise HostError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}.")
    raw = None if input_shape is None else _sample_shape(input_shape)
    if raw is not None and (len(raw) > 3 or math.prod(raw) != widths[0]):
        raise HostError(
            f"mlp: input_shape {raw} must be (features,), (length, channels) or (channels, height, width) with "
            f"widths[0] = {widths[0]} elements; it has {len(raw)} dimensions and {math.prod(raw)} elements."
        )
    if raw is not None and len(raw) == 1:
        raw = None  # a flat vector: the plain MLP
    act = ACTIVATIONS[activation]
    n = len(widths) - 1
    names = [f"fc{i + 1}" for i in range(n)]

    def init_fn(g):
        p = {}
        for i, nm in enumerate(names):
            p[f"{nm}.weight"], p[f"{nm}.bias"] = _linear_init(widths[i + 1], widths[i], g)
        return p, {}

    def forward_fn(flat, x, slot, train):
        if raw is None:
            h = slot("input", x, None)
        elif len(raw) == 2:  # [B, length, channels] -> [B, channels, length] at the slot, then flat
            h = slot("input", x.transpose(-1, -2), None).flatten(-2)
        else:  # [B, channels, height, width]
            h = slot("input", x, None).flatten(-3)
        for i, nm in enumerate(names):
            x_in = h
            h = F.linear(x_in, flat[nm + ".weight"], flat[nm + ".bias"])
            h = slot(nm, h, x_in)
            if i < n - 1:
                h = act(h)
        return h, {}

    def slots_fn(shapes):
        if raw is None:
            specs = [SlotSpec("input", "vector", (shapes["fc1.weight"][1],))]
        elif len(raw) == 2:
            specs = [SlotSpec("input", "conv1d", (raw[1], raw[0]))]
        else:
            specs = [SlotSpec("input", "conv2d", raw)]
        for i, nm in enumerate(names):
            out_f, in_f = shapes[nm + ".weight"]
            hidden = i < n - 1
            specs.append(
                SlotSpec(
                    nm, "vector", (out_f,), layer=nm, layer_type="linear", in_shape=(in_f,),
                    consumer=names[i + 1] if hidden else None,
                    consumer_layer=names[i + 1] if hidden else None,
                    consumer_out=shapes[names[i + 1] + ".weight"][0] if hidden else None,
                    activation=activation if hidden else None,
                )
            )
        return tuple(specs)

    def module_fn(flat):
        layers: dict[str, nn.Module] = {}
        if raw is not None and len(raw) == 2:
            layers["to_channels"] = M.Transpose(-1, -2)
        layers["input"] = nn.Identity()
        if raw is not None:
            layers["flatten"] = nn.Flatten(-len(raw), -1)
        with M.on_meta():
            for i, nm in enumerate(names):
                out_f, in_f = flat[nm + ".weight"].shape
                layers[nm] = nn.Linear(in_f, out_f)
                if i < n - 1:
                    layers[f"act{i + 1}"] = M.activation(activation)
        module = M.load(nn.Sequential(OrderedDict(layers)), flat)
        return module, {"input": "input", **{nm: nm for nm in names}}

    cfg: dict[str, Any] = {"kind": "mlp", "widths": list(widths), "activation": activation}
    if raw is not None:  # only then: the configs (and checkpoints) of flat-vector MLPs are unchanged
        cfg["input_shape"] = list(raw)
    return Host(name or "mlp-" + "-".join(map(str, widths)), init_fn, forward_fn, slots_fn, cfg,
                input_shapes=((widths[0],) if raw is None else tuple(raw),), input_dtypes=(torch.float32,),
                module_fn=module_fn)


# --- 1D CNN ------------------------------------------------------------------------------------


def cnn1d(
    channels: Sequence[int] = (4, 4),
    kernels: Sequence[int] = (5, 3),
    length: int = 40,
    n_classes: int = 10,
    stride: int = 2,
    padding: int = 1,
    name: str | None = None,
    *,
    in_channels: int | None = None,
) -> Host:
    """A 1D CNN host for signals: ReLU conv layers, flatten, one Linear.

    Defaults give the impaired MNIST-1D CNN (conv 1->4 k5 s2 p1, 4->4 k3 s2 p1, fc 40->10; 486
    parameters). ``channels=(25, 25, 25), kernels=(5, 3, 3)`` gives the paper CNN (5,210).

    Input: [B, length] (one channel) by default; with `in_channels` = C, multichannel series
    [B, length, C] (time first), read channels-first.

    Slots: "input" (a vector [B, length], or "conv1d" [B, C, length] with `in_channels`), "conv<i>"
    after each conv (pre-activation), "fc".
    """
    channels, kernels = tuple(channels), tuple(kernels)
    if len(channels) != len(kernels) or not channels:
        raise HostError(f"cnn1d needs one kernel per conv layer, got {channels} and {kernels}.")
    if in_channels is not None and (not isinstance(in_channels, int) or in_channels < 1):
        raise HostError(f"cnn1d: in_channels must be a positive int or None, got {in_channels!r}.")
    lengths = [length]
    for k in kernels:
        lengths.append((lengths[-1] + 2 * padding - k) // stride + 1)
    if lengths[-1] < 1:
        raise HostError(f"cnn1d: length {length} is too short for kernels {kernels}.")
    names = [f"conv{i + 1}" for i in range(len(channels))]
    in_ch = (in_channels or 1,) + channels[:-1]

    def init_fn(g):
        p = {}
        for nm, ci, co, k in zip(names, in_ch, channels, kernels):
            p[f"{nm}.weight"], p[f"{nm}.bias"] = _conv_init(co, ci, k, g)
        p["fc.weight"], p["fc.bias"] = _linear_init(n_classes, channels[-1] * lengths[-1], g)
        return p, {}

    def forward_fn(flat, x, slot, train):
        if in_channels is None:
            h = slot("input", x, None).unsqueeze(-2)
        else:
            h = slot("input", x.transpose(-1, -2), None)
        for nm in names:
            x_in = h
            h = F.conv1d(x_in, flat[nm + ".weight"], flat[nm + ".bias"], stride=stride, padding=padding)
            h = F.relu(slot(nm, h, x_in))
        x_in = h.flatten(-2)
        return slot("fc", F.linear(x_in, flat["fc.weight"], flat["fc.bias"]), x_in), {}

    def slots_fn(shapes):
        if in_channels is None:
            specs = [SlotSpec("input", "vector", (length,))]
        else:
            specs = [SlotSpec("input", "conv1d", (in_channels, length))]
        for i, nm in enumerate(names):
            co, ci, _ = shapes[nm + ".weight"]
            specs.append(
                SlotSpec(nm, "conv1d", (co, lengths[i + 1]), layer=nm, layer_type="conv1d",
                         in_shape=(ci, lengths[i]))
            )
        out_f, in_f = shapes["fc.weight"]
        specs.append(SlotSpec("fc", "vector", (out_f,), layer="fc", layer_type="linear", in_shape=(in_f,)))
        return tuple(specs)

    def module_fn(flat):
        layers: dict[str, nn.Module] = {}
        if in_channels is not None:
            layers["to_channels"] = M.Transpose(-1, -2)
        layers["input"] = nn.Identity()
        if in_channels is None:
            layers["to_channels"] = nn.Unflatten(-1, (1, length))
        with M.on_meta():
            for i, nm in enumerate(names):
                co, ci, k = flat[nm + ".weight"].shape
                layers[nm] = nn.Conv1d(ci, co, k, stride=stride, padding=padding)
                layers[f"act{i + 1}"] = nn.ReLU()
            layers["flatten"] = nn.Flatten(-2, -1)
            out_f, in_f = flat["fc.weight"].shape
            layers["fc"] = nn.Linear(in_f, out_f)
        module = M.load(nn.Sequential(OrderedDict(layers)), flat)
        return module, {"input": "input", "fc": "fc", **{nm: nm for nm in names}}

    cfg = {"kind": "cnn1d", "channels": list(channels), "kernels": list(kernels), "length": length,
           "n_classes": n_classes, "stride": stride, "padding": padding}
    if in_channels is not None:  # only then: one-channel CNNs keep their configs (and checkpoints)
        cfg["in_channels"] = in_channels
    return Host(name or "cnn1d-" + "-".join(map(str, channels)), init_fn, forward_fn, slots_fn, cfg,
                input_shapes=((length,) if in_channels is None else (length, in_channels),),
                input_dtypes=(torch.float32,), module_fn=module_fn)


# --- 2D CNN ------------------------------------------------------------------------------------


def _conv2d_init(out_c: int, in_c: int, k: int, g: torch.Generator | None) -> tuple[Tensor, Tensor]:
    bound = 1 / math.sqrt(in_c * k * k)  # nn.Conv2d's default distribution
    return _uniform((out_c, in_c, k, k), bound, g), _uniform((out_c,), bound, g)


def cnn2d(
    channels: Sequence[int] = (4, 4),
    kernels: Sequence[int] = (3, 3),
    image_shape: Sequence[int] = (1, 28, 28),
    n_classes: int = 10,
    stride: int = 2,
    padding: int = 1,
    name: str | None = None,
) -> Host:
    """A 2D CNN host for images [B, channels, height, width]: ReLU conv layers, flatten, one Linear.

    Defaults give a small MNIST CNN: conv 1->4 k3 s2 p1 (28x28 -> 14x14), 4->4 k3 s2 p1 (-> 7x7),
    fc 196->10; 2,158 parameters. Parameters: sum over layers of ``c_out * (c_in * k * k + 1)``
    plus ``(channels[-1] * h_out * w_out + 1) * n_classes``.

    Slots: "input" on the raw image ("conv2d", so conv2d seeds attach there), "conv<i>" after each
    conv (pre-activation, "conv2d"), "fc" (the logits, a vector).

    Raises:
        HostError: mismatched channels and kernels, an `image_shape` that is not
            (channels, height, width), or an image too small for the conv stack.
    """
    channels, kernels = tuple(int(c) for c in channels), tuple(int(k) for k in kernels)
    if len(channels) != len(kernels) or not channels or min(channels + kernels) < 1:
        raise HostError(
            f"cnn2d needs one positive kernel per conv layer, got channels {channels} and kernels {kernels}."
        )
    image = _sample_shape(image_shape)
    if len(image) != 3:
        raise HostError(f"cnn2d: image_shape must be (channels, height, width), got {image}.")
    sizes = [image[1:]]
    for k in kernels:
        sizes.append(tuple((d + 2 * padding - k) // stride + 1 for d in sizes[-1]))
    if min(sizes[-1]) < 1:
        raise HostError(f"cnn2d: images of shape {image} are too small for kernels {kernels} (stride {stride}).")
    names = [f"conv{i + 1}" for i in range(len(channels))]
    in_ch = (image[0],) + channels[:-1]

    def init_fn(g):
        p = {}
        for nm, ci, co, k in zip(names, in_ch, channels, kernels):
            p[f"{nm}.weight"], p[f"{nm}.bias"] = _conv2d_init(co, ci, k, g)
        p["fc.weight"], p["fc.bias"] = _linear_init(n_classes, channels[-1] * math.prod(sizes[-1]), g)
        return p, {}

    def forward_fn(flat, x, slot, train):
        h = slot("input", x, None)
        for nm in names:
            x_in = h
            h = F.conv2d(x_in, flat[nm + ".weight"], flat[nm + ".bias"], stride=stride, padding=padding)
            h = F.relu(slot(nm, h, x_in))
        x_in = h.flatten(-3)
        return slot("fc", F.linear(x_in, flat["fc.weight"], flat["fc.bias"]), x_in), {}

    def slots_fn(shapes):
        specs = [SlotSpec("input", "conv2d", image)]
        for i, nm in enumerate(names):
            co, ci, _, _ = shapes[nm + ".weight"]
            specs.append(
                SlotSpec(nm, "conv2d", (co, *sizes[i + 1]), layer=nm, layer_type="conv2d", in_shape=(ci, *sizes[i]))
            )
        out_f, in_f = shapes["fc.weight"]
        specs.append(SlotSpec("fc", "vector", (out_f,), layer="fc", layer_type="linear", in_shape=(in_f,)))
        return tuple(specs)

    def module_fn(flat):
        layers: dict[str, nn.Module] = {"input": nn.Identity()}
        with M.on_meta():
            for i, nm in enumerate(names):
                co, ci, k, _ = flat[nm + ".weight"].shape
                layers[nm] = nn.Conv2d(ci, co, k, stride=stride, padding=padding)
                layers[f"act{i + 1}"] = nn.ReLU()
            layers["flatten"] = nn.Flatten(-3, -1)
            out_f, in_f = flat["fc.weight"].shape
            layers["fc"] = nn.Linear(in_f, out_f)
        module = M.load(nn.Sequential(OrderedDict(layers)), flat)
        return module, {"input": "input", "fc": "fc", **{nm: nm for nm in names}}

    cfg = {"kind": "cnn2d", "channels": list(channels), "kernels": list(kernels), "image_shape": list(image),
           "n_classes": n_classes, "stride": stride, "padding": padding}
    return Host(name or "cnn2d-" + "-".join(map(str, channels)), init_fn, forward_fn, slots_fn, cfg,
                input_shapes=(image,), input_dtypes=(torch.float32,), module_fn=module_fn)


# --- transformer -------------------------------------------------------------------------------


def transformer(
    seq_len: int = 40,
    d_model: int = 32,
    n_heads: int = 4,
    n_layers: int = 2,
    n_classes: int = 10,
    in_features: int = 1,
    vocab_size: int | None = None,
    mlp_ratio: int = 2,
    name: str | None = None,
) -> Host:
    """A small pre-norm transformer classifier for sequences.

    Input: [B, T] integer tokens if `vocab_size` is set, else [B, T] (``in_features == 1``) or
    [B, T, in_features] real values. Token embedding + learned positions, `n_layers` pre-norm
    blocks (multi-head self-attention, GELU MLP), final LayerNorm, mean pooling, Linear head.

    Slots: "input" on the embedded sequence ([B, T, d_model]), "block<i>" after each block.
    """
    if d_model % n_heads:
        raise HostError(f"transformer: d_model={d_model} must be divisible by n_heads={n_heads}.")
    hd = d_model * mlp_ratio

    def init_fn(g):
        p: dict[str, Tensor] = {}
        if vocab_size is not None:
            p["embed.weight"] = torch.randn(vocab_size, d_model, generator=g) * 0.02
        else:
            p["embed.weight"], p["embed.bias"] = _linear_init(d_model, in_features, g)
        p["pos"] = torch.randn(seq_len, d_model, generator=g) * 0.02
        for i in range(n_layers):
            b = f"blocks.{i}."
            p[b + "ln1.weight"], p[b + "ln1.bias"] = torch.ones(d_model), torch.zeros(d_model)
            p[b + "attn.in_proj.weight"], p[b + "attn.in_proj.bias"] = _linear_init(3 * d_model, d_model, g)
            p[b + "attn.out_proj.weight"], p[b + "attn.out_proj.bias"] = _linear_init(d_model, d_model, g)
            p[b + "ln2.weight"], p[b + "ln2.bias"] = torch.ones(d_model), torch.zeros(d_model)
            p[b + "mlp.fc1.weight"], p[b + "mlp.fc1.bias"] = _linear_init(hd, d_model, g)
            p[b + "mlp.fc2.weight"], p[b + "mlp.fc2.bias"] = _linear_init(d_model, hd, g)
        p["ln_f.weight"], p["ln_f.bias"] = torch.ones(d_model), torch.zeros(d_model)
        p["head.weight"], p["head.bias"] = _linear_init(n_classes, d_model, g)
        return p, {}

    def forward_fn(flat, x, slot, train):
        if vocab_size is not None:
            h = F.embedding(x, flat["embed.weight"])
        else:
            if x.dim() == 2:
                x = x.unsqueeze(-1)
            h = F.linear(x, flat["embed.weight"], flat["embed.bias"])
        h = slot("input", h + flat["pos"], None)
        for i in range(n_layers):
            b = f"blocks.{i}."
            x_in = h
            a = F.layer_norm(h, (d_model,), flat[b + "ln1.weight"], flat[b + "ln1.bias"])
            qkv = F.linear(a, flat[b + "attn.in_proj.weight"], flat[b + "attn.in_proj.bias"])
            q, k, v = qkv.unflatten(-1, (3, n_heads, d_model // n_heads)).unbind(-3)
            q, k, v = q.transpose(-2, -3), k.transpose(-2, -3), v.transpose(-2, -3)  # [..., H, T, hd]
            # Written out rather than F.scaled_dot_product_attention: its fused CPU kernel cannot be
            # vmapped (stacked hosts), and at these sizes the plain form is as fast.
            att = torch.softmax(q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5), dim=-1) @ v
            att = att.transpose(-2, -3).flatten(-2)
            h = h + F.linear(att, flat[b + "attn.out_proj.weight"], flat[b + "attn.out_proj.bias"])
            m = F.layer_norm(h, (d_model,), flat[b + "ln2.weight"], flat[b + "ln2.bias"])
            m = F.linear(F.gelu(F.linear(m, flat[b + "mlp.fc1.weight"], flat[b + "mlp.fc1.bias"])),
                         flat[b + "mlp.fc2.weight"], flat[b + "mlp.fc2.bias"])
            h = slot(f"block{i + 1}", h + m, x_in)
        h = F.layer_norm(h, (d_model,), flat["ln_f.weight"], flat["ln_f.bias"]).mean(-2)
        return F.linear(h, flat["head.weight"], flat["head.bias"]), {}

    def slots_fn(shapes):
        specs = [SlotSpec("input", "sequence", (seq_len, d_model))]
        for i in range(n_layers):
            specs.append(SlotSpec(f"block{i + 1}", "sequence", (seq_len, d_model), layer=f"blocks.{i}",
                                  layer_type="block", in_shape=(seq_len, d_model)))
        return tuple(specs)

    def module_fn(flat):
        with M.on_meta():
            embed = (nn.Embedding(vocab_size, d_model) if vocab_size is not None
                     else nn.Linear(in_features, d_model))
            blocks = [M.TransformerBlock(d_model, n_heads, hd) for _ in range(n_layers)]
            net = M.TransformerNet(embed, seq_len, d_model, blocks, n_classes)
        module = M.load(net, flat)
        return module, {"input": "input", **{f"block{i + 1}": f"blocks.{i}" for i in range(n_layers)}}

    cfg = {"kind": "transformer", "seq_len": seq_len, "d_model": d_model, "n_heads": n_heads,
           "n_layers": n_layers, "n_classes": n_classes, "in_features": in_features,
           "vocab_size": vocab_size, "mlp_ratio": mlp_ratio}
    if vocab_size is not None:
        shapes, dtypes = ((seq_len,),), (torch.int64, torch.int32)
    else:
        shapes = ((seq_len,), (seq_len, 1)) if in_features == 1 else ((seq_len, in_features),)
        dtypes = (torch.float32,)
    return Host(name or f"transformer-{d_model}x{n_layers}", init_fn, forward_fn, slots_fn, cfg,
                input_shapes=shapes, input_dtypes=dtypes, module_fn=module_fn)


# --- wrap an arbitrary nn.Module -----------------------------------------------------------------

SLOT_TYPES: dict[type, str] = {
    nn.Linear: "linear",
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.MultiheadAttention: "attention",
    nn.TransformerEncoderLayer: "block",
    nn.TransformerDecoderLayer: "block",
    nn.LayerNorm: "norm",
    nn.BatchNorm1d: "norm",
    nn.BatchNorm2d: "norm",
}
_ELEMENTWISE = {nn.ReLU: "relu", nn.GELU: "gelu", nn.Tanh: "tanh", nn.SiLU: "silu"}


def _slot_name(path: str) -> str:
    return path.replace(".", "_")


def wrap(
    module: nn.Module,
    example_input: Tensor,
    slots: Sequence[str | type] = (nn.Linear,),
    *,
    input_slot: bool = True,
    name: str | None = None,
) -> Host:
    """Turn any `nn.Module` into a host with slots after chosen submodules.

    The module is deep-copied; the copy gets forward hooks at the slot points and is run with
    `torch.func.functional_call`, so the functional forward equals the module's forward (buffers
    included: a training forward returns updated BatchNorm statistics instead of mutating them).
    The caller's module is never modified. Attention modules always run their composite path (the
    eval-mode fused "fast path" of `nn.MultiheadAttention` is switched off for the call), so
    `apply`, `train_step` and `export` compute the same values, and stacked hosts can be vmapped.

    Each slot records the shape and dtype the example forward gives it; a slot on integer tokens
    (the input of a model that starts with `nn.Embedding`) accepts no seed.

    `esper_fn.init(host)` starts from the module's own weights; ``init(host, generator=g)`` draws
    fresh ones from `g`, each parameter by the reset rule of the layer that owns it (what its
    `reset_parameters` does: kaiming-uniform Linear and conv weights with U(+-1/sqrt(fan_in))
    biases, norms at 1 and 0 with their running statistics reset, N(0, 1) embeddings, xavier
    attention projections, ...; in `named_parameters` order, so deterministic given `g`), and
    refuses with `HostError` a module holding a parameter no known rule covers.

    Args:
        module: the network. Its parameters are the initial host parameters when `init` gets no
            generator.
        example_input: one batch (any batch size >= 1) used to record slot shapes and dtypes; its
            per-sample shape and dtype are the host's input (`apply` and `train_step` check every
            batch against them).
        slots: submodule paths ("encoder.fc1") and/or submodule types (`nn.Linear`, `nn.Conv1d`,
            `nn.Conv2d`, `nn.MultiheadAttention`, `nn.TransformerEncoderLayer`, `nn.LayerNorm`,
            `nn.BatchNorm1d`, `nn.BatchNorm2d`); a slot follows each matching submodule's output.
        input_slot: also add a slot named "input" on the raw input.
        name: host name (default: the module's class name).

    Raises:
        HostError: an unknown submodule path (listing the valid ones), an unsupported type
            (listing the supported ones), a type with no match, a `MultiheadAttention`
            without ``batch_first=True``, or an unbatched `example_input`.
    """
    template = copy.deepcopy(module)
    named = dict(template.named_modules())
    chosen: dict[str, nn.Module] = {}
    for s in slots:
        if isinstance(s, str):
            if s not in named or s == "":
                raise HostError(
                    f"wrap: no submodule named {s!r}; valid names are {sorted(n for n in named if n)}."
                )
            chosen[s] = named[s]
        elif isinstance(s, type):
            if s not in SLOT_TYPES:
                raise HostError(
                    f"wrap: slots after {s.__name__} are not supported; supported types are "
                    f"{sorted(t.__name__ for t in SLOT_TYPES)}."
                )
            found = {n: m for n, m in named.items() if n and type(m) is s}
            if not found:
                present = sorted({type(m).__name__ for n, m in named.items() if n})
                raise HostError(
                    f"wrap: the module has no {s.__name__} submodule; it contains {present}."
                )
            chosen.update(found)
        else:
            raise HostError(f"wrap: a slot must be a submodule path or a module type, got {s!r}.")
    names_seen: dict[str, str] = {"input": "the input slot"} if input_slot else {}
    for path in chosen:
        sname = _slot_name(path)
        if sname in names_seen:
            raise HostError(f"wrap: submodule {path!r} would get slot name {sname!r}, which {names_seen[sname]} "
                            "already has. Rename the submodule, or pass input_slot=False.")
        names_seen[sname] = f"submodule {path!r}"
    for path, m in chosen.items():
        if isinstance(m, nn.MultiheadAttention) and not m.batch_first:
            raise HostError(f"wrap: {path!r} is a MultiheadAttention without batch_first=True; "
                            "only batch-first attention can host a slot.")

    # The slot function of the forward in progress; hooks read it. A list so closures can rebind.
    active: list[SlotFn] = [identity_slot]

    def make_hook(path: str):
        sname = _slot_name(path)

        def hook(mod, args, out):
            x_in = args[0] if args else None
            if isinstance(out, tuple):  # MultiheadAttention returns (output, weights)
                return (active[0](sname, out[0], x_in),) + out[1:]
            return active[0](sname, out, x_in)

        return hook

    handles: list[tuple[str, Any]] = []  # (submodule path, hook handle): removed from a copy on export
    for path, m in chosen.items():
        handles.append((path, m.register_forward_hook(make_hook(path))))
    if input_slot:
        handles.append(("", template.register_forward_pre_hook(
            lambda mod, args: (active[0]("input", args[0], None),) + args[1:])))

    param_names = [n for n, _ in template.named_parameters()]
    buffer_names = [n for n, _ in template.named_buffers()]
    init_params = {n: p.detach().clone() for n, p in template.named_parameters()}
    init_buffers = {n: b.detach().clone() for n, b in template.named_buffers()}

    # Width growth applies to Linear -> elementwise activation -> Linear inside a Sequential.
    consumers: dict[str, tuple[str, str]] = {}
    for cname, container in named.items():
        if isinstance(container, nn.Sequential):
            kids = list(container.named_children())
            for i in range(len(kids) - 2):
                (n0, m0), (_, m1), (n2, m2) = kids[i], kids[i + 1], kids[i + 2]
                if isinstance(m0, nn.Linear) and type(m1) in _ELEMENTWISE and isinstance(m2, nn.Linear):
                    pre = f"{cname}." if cname else ""
                    consumers[pre + n0] = (pre + n2, _ELEMENTWISE[type(m1)])

    # nn.MultiheadAttention (and the Transformer layers built on it) take a fused "fast path" in eval
    # mode only when no input requires grad, so the same weights gave different outputs (up to ~2e-6)
    # as plain tensors (`apply`) and as nn.Parameters (`export`), and the fused kernel cannot be
    # vmapped (stacked hosts). The wrapped forward always runs the composite path.
    has_mha = any(isinstance(m, nn.MultiheadAttention) for m in template.modules())

    def forward_fn(flat, x, slot, train):
        template.train(train)
        call = dict(flat)
        new_buffers = {}
        if train and buffer_names:
            # Training-mode BatchNorm updates running statistics in place: give it copies.
            for b in buffer_names:
                new_buffers[b] = call[b] = call[b].clone()
        active[0] = slot
        fastpath = torch.backends.mha.get_fastpath_enabled()
        if has_mha and fastpath:
            torch.backends.mha.set_fastpath_enabled(False)
        try:
            y = torch.func.functional_call(template, call, (x,))
        finally:
            active[0] = identity_slot
            if has_mha and fastpath:
                torch.backends.mha.set_fastpath_enabled(True)
        return y, new_buffers

    # Record slot shapes with one eval-mode forward on the example input.
    recorded: dict[str, tuple[tuple[int, ...], tuple[int, ...] | None, torch.dtype]] = {}

    def recorder(sname, h, x_in=None):
        if (h.dtype.is_floating_point or h.dtype.is_complex) and h.dim() < 2:
            raise HostError(
                f"wrap: slot {sname!r} got a tensor of shape {list(h.shape)} from example_input of shape "
                f"{list(example_input.shape)}: the example must be a batch, [B, *sample_shape] (for one sample "
                "pass x[None], i.e. x.unsqueeze(0)); slot shapes are recorded without the batch dimension."
            )
        if sname in recorded:
            raise HostError(f"wrap: slot {sname!r} was reached twice in one forward (a submodule called more "
                            "than once); a slot must follow a submodule that runs once per forward.")
        recorded[sname] = (tuple(h.shape), None if x_in is None else tuple(x_in.shape), h.dtype)
        return h

    with torch.no_grad():
        forward_fn({**init_params, **init_buffers}, example_input, recorder, False)
    module_types = {path: SLOT_TYPES.get(type(m), "other") for path, m in chosen.items()}
    never = [p for p in chosen if _slot_name(p) not in recorded]
    if never:
        raise HostError(f"wrap: submodules {never} never ran in the forward on `example_input`; slots must "
                        "follow submodules the forward uses.")
    order = list(recorded)  # slots in the order the forward reaches them (the last one is the output side)
    path_of = {_slot_name(p): p for p in chosen}

    def slots_fn(shapes):
        specs = []
        items = [(n, path_of.get(n)) for n in order]
        for sname, path in items:
            out_shape, in_shape, dtype = recorded[sname]
            ltype = module_types.get(path) if path else None
            nd = len(out_shape)
            kind = {2: "vector", 4: "conv2d"}.get(nd)
            if nd == 3:
                kind = "conv1d" if ltype == "conv1d" or isinstance(chosen.get(path), nn.BatchNorm1d) else "sequence"
            if kind is None:
                kind = "other"
            shape = out_shape[1:]
            cons = consumers.get(path) if path else None
            if cons is not None and cons[0] not in chosen:
                cons = None  # the consumer must be a slot point for the widened units to land
            if path and ltype == "linear":  # width growth may have changed the out features
                shape = shape[:-1] + (shapes[path + ".weight"][0],)
            specs.append(SlotSpec(sname, kind, shape, layer=path, layer_type=ltype,
                                  in_shape=None if in_shape is None else in_shape[1:],
                                  consumer=_slot_name(cons[0]) if cons else None,
                                  consumer_layer=cons[0] if cons else None,
                                  consumer_out=shapes[cons[0] + ".weight"][0] if cons else None,
                                  activation=cons[1] if cons else None, dtype=dtype))
        return tuple(specs)

    rules, unsupported = _reset_rules(template)
    reset_buffers = _reset_buffers(template)

    def init_fn(g):
        if g is None or g is _SHAPE_PROBE:  # the module's own weights
            return ({k: v.clone() for k, v in init_params.items()}, {k: v.clone() for k, v in init_buffers.items()})
        if unsupported:
            raise HostError(
                f"init: cannot draw the weights of wrapped host {name or type(module).__name__!r} from a generator: "
                f"parameter(s) {[n for n, _ in unsupported]} belong to module type(s) "
                f"{sorted({t for _, t in unsupported})}, which have no known reset rule (rules exist for "
                f"{', '.join(_RULE_TYPES)}). Call `esper_fn.init(host)` without a generator to start from the "
                "module's own weights (for a seed sweep, build and wrap the module once per seed)."
            )
        # Drawn where the generator lives (a CPU generator on the CPU), then put where the module's
        # weights are: one generator gives the same weights on every device.
        params = {n: rule(torch.empty_like(init_params[n], device=g.device), g).to(init_params[n].device)
                  for n, rule in rules.items()}
        buffers = {n: reset_buffers[n](v) if n in reset_buffers else v.clone() for n, v in init_buffers.items()}
        return params, buffers

    def module_fn(flat):
        # The template without the slot hooks (closures: neither picklable nor wanted), holding `flat`.
        net = copy.deepcopy(template)
        for path, handle in handles:
            sub = net.get_submodule(path)
            for hooks in (sub._forward_hooks, sub._forward_hooks_with_kwargs, sub._forward_hooks_always_called,
                          sub._forward_pre_hooks, sub._forward_pre_hooks_with_kwargs):
                hooks.pop(handle.id, None)
        M.load(net, flat)
        for m in net.modules():  # width growth may have widened a Linear: its repr reads these
            if isinstance(m, nn.Linear):
                m.out_features, m.in_features = m.weight.shape
        paths = {_slot_name(p): p for p in chosen}
        if input_slot:
            paths["input"] = ""
        if has_mha:
            net = M.CompositeAttention(net)
            paths = {k: (f"net.{v}" if v else "") for k, v in paths.items()}
        return net, paths

    cfg = {"kind": "wrap", "module": type(module).__name__, "slots": sorted(chosen), "input_slot": input_slot,
           "param_names": param_names}
    x_dtype = example_input.dtype
    dtypes = (x_dtype,) if x_dtype.is_floating_point or x_dtype.is_complex or x_dtype == torch.bool else (
        (torch.int64, torch.int32) if x_dtype in (torch.int64, torch.int32) else (x_dtype,))
    return Host(name or type(module).__name__, init_fn, forward_fn, slots_fn, cfg,
                input_shapes=(tuple(example_input.shape[1:]),), input_dtypes=dtypes, module_fn=module_fn)


_RULE_TYPES = ("nn.Linear", "nn.Conv1d/2d/3d", "nn.ConvTranspose1d/2d/3d", "nn.LayerNorm", "nn.GroupNorm",
               "nn.RMSNorm", "nn.BatchNorm1d/2d/3d", "nn.InstanceNorm1d/2d/3d", "nn.Embedding",
               "nn.MultiheadAttention", "nn.RNN/LSTM/GRU and their cells", "nn.PReLU")
_LINEAR_LIKE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
          nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)

Rule = Callable[[Tensor, torch.Generator], Tensor]


def _fan_in(weight: Tensor) -> int:
    # torch.nn.init's fan-in of a Linear or conv weight: size(1) times the receptive field.
    return weight.shape[1] * math.prod(weight.shape[2:]) if weight.dim() >= 2 else weight.shape[0]


def _rule(m: nn.Module, local: str) -> Rule | None:
    """How `m.reset_parameters()` draws its parameter `local`, with an explicit generator; None if unknown."""
    init = nn.init
    if isinstance(m, _LINEAR_LIKE):
        if local == "weight":
            return lambda like, g: init.kaiming_uniform_(torch.empty_like(like), a=math.sqrt(5), generator=g)
        if local == "bias":
            fan_in = _fan_in(m.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            return lambda like, g: init.uniform_(torch.empty_like(like), -bound, bound, generator=g)
    if isinstance(m, _NORMS):
        if local == "weight":
            return lambda like, g: torch.ones_like(like)
        if local == "bias":
            return lambda like, g: torch.zeros_like(like)
    if isinstance(m, nn.Embedding) and local == "weight":
        pad = m.padding_idx

        def embedding(like, g):
            w = init.normal_(torch.empty_like(like), generator=g)
            if pad is not None:
                w[pad] = 0
            return w

        return embedding
    if isinstance(m, nn.MultiheadAttention):
        if local in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            return lambda like, g: init.xavier_uniform_(torch.empty_like(like), generator=g)
        if local == "in_proj_bias":
            return lambda like, g: torch.zeros_like(like)
        if local in ("bias_k", "bias_v"):
            return lambda like, g: init.xavier_normal_(torch.empty_like(like), generator=g)
    if isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
        stdv = 1.0 / math.sqrt(m.hidden_size) if m.hidden_size > 0 else 0.0
        return lambda like, g: init.uniform_(torch.empty_like(like), -stdv, stdv, generator=g)
    if isinstance(m, nn.PReLU) and local == "weight":
        return lambda like, g: torch.full_like(like, m.init)
    return None


def _reset_rules(template: nn.Module) -> tuple[dict[str, Rule], list[tuple[str, str]]]:
    """Per parameter (in `named_parameters` order, the order the draws are made): the reset rule of
    the module that owns it; and the (parameter, module type) pairs that have none."""
    owner: dict[int, tuple[nn.Module, str]] = {}
    overrides: dict[int, Rule] = {}
    for _, m in template.named_modules():
        for local, p in m.named_parameters(recurse=False):
            owner.setdefault(id(p), (m, local))
        if isinstance(m, nn.MultiheadAttention) and m.in_proj_bias is not None:
            overrides[id(m.out_proj.bias)] = lambda like, g: torch.zeros_like(like)  # as its _reset_parameters
    rules: dict[str, Rule] = {}
    unsupported: list[tuple[str, str]] = []
    for name, p in template.named_parameters():
        m, local = owner[id(p)]
        rule = overrides.get(id(p)) or _rule(m, local)
        if rule is None:
            unsupported.append((name, type(m).__name__))
        else:
            rules[name] = rule
    return rules, unsupported


def _reset_buffers(template: nn.Module) -> dict[str, Callable[[Tensor], Tensor]]:
    """Buffers a fresh init resets (BatchNorm and InstanceNorm running statistics); others are kept."""
    out: dict[str, Callable[[Tensor], Tensor]] = {}
    for path, m in template.named_modules():
        if isinstance(m, _NORMS):
            pre = f"{path}." if path else ""
            for local, _ in m.named_buffers(recurse=False):
                fill = 1.0 if local == "running_var" else 0.0
                out[pre + local] = lambda v, fill=fill: torch.full_like(v, fill)
    return out


def hosts() -> dict[str, functools.partial]:
    """The named built-in host presets (used by configs and the CLI).

    Returns:
        ``{name: builder}``; each builder is a `functools.partial` of `mlp_preset`,
        `cnn1d_preset`, `transformer_preset`, or of a width family's `mlp_width_preset`,
        `cnn1d_width_preset` or `cnn2d_width_preset` (read ``builder.func.__doc__`` and
        ``builder.keywords``) that takes ``input_shape`` and ``n_classes`` (defaults: MNIST-1D,
        ``(40,)`` and 10; MNIST-5k images, ``(1, 28, 28)``, for the cnn2d presets), so
        ``hosts()["mlp-impaired"]()`` is the 826-parameter MLP. Build a preset for another task with
        `preset`.
    """
    return dict(HOST_PRESETS)


def _sample_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in input_shape)
    if not shape or min(shape) < 1:
        raise HostError(f"input_shape must be the shape of one sample (positive ints), got {tuple(input_shape)}.")
    return shape


def mlp_preset(hidden: Sequence[int], *, name: str, input_shape: Sequence[int] = (40,), n_classes: int = 10,
               activation: str = "relu") -> Host:
    """An MLP preset sized for a task: widths ``(features, *hidden, n_classes)``.

    Args:
        hidden: the hidden widths, e.g. (16,) for "mlp-impaired".
        name: the preset name the host carries.
        input_shape: the shape of one sample; an MLP reads flat vectors, so it must be ``(features,)``.
        n_classes: output width.

    Raises:
        HostError: `input_shape` is not one-dimensional (naming both shapes).
    """
    shape = _sample_shape(input_shape)
    if len(shape) != 1:
        raise HostError(
            f"host preset {name!r} is an MLP over flat vectors [features] (its default input is (40,)), but the "
            f"task's samples have shape {shape}. Pick a task with 1-d samples (mnist1d, digits, spirals) or a "
            f"sequence host (transformer-small) for this task, or an mlp-w<width> preset (e.g. mlp-w16), which "
            f"flattens series and images."
        )
    return mlp((shape[0], *hidden, n_classes), activation=activation, name=name)


def cnn1d_preset(channels: Sequence[int], kernels: Sequence[int], *, name: str, input_shape: Sequence[int] = (40,),
                 n_classes: int = 10) -> Host:
    """A 1D CNN preset sized for a task: signals of length ``input_shape[0]``, `n_classes` outputs.

    Args:
        channels, kernels: the conv layers (stride 2, padding 1), e.g. (4, 4) and (5, 3) for "cnn-impaired".
        name: the preset name the host carries.
        input_shape: the shape of one sample, ``(length,)``.
        n_classes: output width.

    Raises:
        HostError: `input_shape` is not ``(length,)``, or the signal is too short for the kernels
            (naming both shapes).
    """
    shape = _sample_shape(input_shape)
    if len(shape) != 1:
        raise HostError(
            f"host preset {name!r} is a 1D CNN over signals [length] (its default input is (40,)), but the task's "
            f"samples have shape {shape}. Pick a task with 1-d samples, a sequence host (transformer-small), or a "
            f"cnn1d-w<width> preset (e.g. cnn1d-w4), which reads series [length, channels]."
        )
    length = shape[0]
    for k in kernels:
        length = (length + 2 - k) // 2 + 1
    if length < 1:
        raise HostError(
            f"host preset {name!r} (conv kernels {tuple(kernels)}, stride 2; its default input is (40,)) needs a "
            f"longer signal than the task's samples of shape {shape}: its conv stack reduces length {shape[0]} to "
            f"{length}. Use an MLP host (mlp-impaired) for this task."
        )
    return cnn1d(channels, kernels, length=shape[0], n_classes=n_classes, name=name)


def transformer_preset(*, name: str, input_shape: Sequence[int] = (40,), n_classes: int = 10, d_model: int = 32,
                       n_heads: int = 4, n_layers: int = 2) -> Host:
    """A small transformer preset sized for a task: ``(seq_len,)`` or ``(seq_len, in_features)`` samples.

    Raises:
        HostError: `input_shape` has more than two dimensions (naming both shapes).
    """
    shape = _sample_shape(input_shape)
    if len(shape) > 2:
        raise HostError(
            f"host preset {name!r} is a transformer over sequences [seq_len] or [seq_len, features] (its default "
            f"input is (40,)), but the task's samples have shape {shape}."
        )
    return transformer(seq_len=shape[0], in_features=shape[1] if len(shape) == 2 else 1, n_classes=n_classes,
                       d_model=d_model, n_heads=n_heads, n_layers=n_layers, name=name)


def _check_width(name: str, width: int) -> None:
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise HostError(f"host preset {name!r}: width must be a positive int, got {width!r}.")


def mlp_width_preset(width: int, *, depth: int = 1, name: str | None = None, input_shape: Sequence[int] = (40,),
                     n_classes: int = 10, activation: str = "relu") -> Host:
    """An MLP of `depth` hidden layers of `width` units over any sample, flattened ("mlp-w<width>").

    Widths ``(F, width, ..., n_classes)`` with F the element count of one sample, so on flat
    vectors this is `mlp_preset` (``mlp-w16`` on MNIST-1D is ``mlp-impaired``'s 40-16-10). Series
    [length, channels] and images [channels, height, width] are read raw: the "input" slot sees
    them channels-first ("conv1d" or "conv2d" kind, so conv seeds attach on the raw signal or
    image), then the MLP flattens them. Its deficits: a small `width` is a width bottleneck at
    ``fc1``; on signals and images it has no locality or translation prior (an input conv seed
    supplies one).

    Parameters (depth 1): ``F * width + width + width * n_classes + n_classes``; each further
    hidden layer adds ``width * width + width``. E.g. width 16: 826 on MNIST-1D (F = 40), 2,450 on
    GunPoint (F = 150, 2 classes), 9,684 on BasicMotions (F = 600, 4 classes), 12,730 on MNIST-5k
    (F = 784).

    Args:
        width: hidden units per layer (>= 1).
        depth: hidden layers (>= 1).
        name: the host's name; default "mlp-w<width>" (depth 1) or "mlp-d<depth>-w<width>".
        input_shape: the shape of one sample: (features,), (length, channels) or
            (channels, height, width).
        n_classes: output width.

    Raises:
        HostError: a width or depth that is not a positive int, or samples of more than three
            dimensions (naming both shapes).
    """
    name = name or (f"mlp-w{width}" if depth == 1 else f"mlp-d{depth}-w{width}")
    _check_width(name, width)
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise HostError(f"host preset {name!r}: depth must be a positive int, got {depth!r}.")
    shape = _sample_shape(input_shape)
    if len(shape) > 3:
        raise HostError(
            f"host preset {name!r} is an MLP over samples of shape (features,), (length, channels) or (channels, "
            f"height, width) (its default input is (40,)), but the task's samples have shape {shape}."
        )
    return mlp((math.prod(shape), *(width,) * depth, n_classes), activation=activation, name=name,
               input_shape=shape)


def cnn1d_width_preset(width: int, *, layers: int = 2, name: str | None = None, input_shape: Sequence[int] = (40,),
                       n_classes: int = 10) -> Host:
    """A 1D CNN with `layers` conv layers of `width` channels, no normalisation ("cnn1d-w<width>",
    "cnn1d-shallow-w<width>" for one layer).

    Conv 1 has kernel 5, later ones kernel 3, all stride 2 and padding 1, ReLU after each, then a
    Linear on the flattened maps (`cnn1d`). Two layers at width 4 on a one-channel series is
    ``cnn-impaired`` (486 parameters on MNIST-1D). Univariate series [length] are read as one
    channel (a "vector" input slot); multivariate series [length, channels] channels-first (a
    "conv1d" input slot). Its deficits: few channels; no normalisation; with one layer, too little
    depth (a conv seed after ``conv1`` adds some).

    Parameters: ``width * (5 * C + 1)`` for conv 1 (C input channels), ``width * (3 * width + 1)``
    for each later conv, ``(width * L_out + 1) * n_classes`` for the Linear, where
    ``L_out = (L_prev + 2 - k) // 2 + 1`` per layer. E.g. width 4, two layers: 486 on MNIST-1D, 374
    on GunPoint, 580 on BasicMotions (C = 6); one layer: 794 on MNIST-1D, 618 on GunPoint.

    Raises:
        HostError: a width or layer count that is not a positive int, samples that are not
            (length,) or (length, channels), or a series too short for the kernels (naming both
            shapes).
    """
    if name is None:
        name = {1: f"cnn1d-shallow-w{width}", 2: f"cnn1d-w{width}"}.get(layers, f"cnn1d-l{layers}-w{width}")
    _check_width(name, width)
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise HostError(f"host preset {name!r}: layers must be a positive int, got {layers!r}.")
    shape = _sample_shape(input_shape)
    if len(shape) > 2:
        raise HostError(
            f"host preset {name!r} is a 1D CNN over series [length] or [length, channels] (its default input is "
            f"(40,)), but the task's samples have shape {shape}. Use a cnn2d-w<width> preset for images "
            f"[channels, height, width], or an mlp-w<width> preset."
        )
    kernels = (5,) + (3,) * (layers - 1)
    length = shape[0]
    for k in kernels:
        length = (length + 2 - k) // 2 + 1
    if length < 1:
        raise HostError(
            f"host preset {name!r} (conv kernels {kernels}, stride 2; its default input is (40,)) needs a longer "
            f"series than the task's samples of shape {shape}: its conv stack reduces length {shape[0]} to {length}. "
            f"Use an MLP host (mlp-w<width>) for this task."
        )
    return cnn1d((width,) * layers, kernels, length=shape[0], n_classes=n_classes, name=name,
                 in_channels=shape[1] if len(shape) == 2 else None)


def cnn2d_width_preset(width: int, *, name: str | None = None, input_shape: Sequence[int] = (1, 28, 28),
                       n_classes: int = 10) -> Host:
    """A small 2D CNN for images [channels, height, width] ("cnn2d-w<width>"): two conv layers of
    `width` channels (kernel 3, stride 2, padding 1, ReLU), no normalisation, then a Linear (`cnn2d`).

    Slots: "input" on the raw image and "conv1", "conv2" ("conv2d" kind: conv2d seeds attach), "fc".
    Parameters: ``width * (9 * C + 1) + width * (9 * width + 1) + (width * H2 * W2 + 1) * n_classes``
    with ``H2, W2`` the maps after two stride-2 convs (7 x 7 for 28 x 28). E.g. on MNIST-5k images:
    2,158 at width 4, 4,594 at width 8, 10,330 at width 16.

    Raises:
        HostError: a width that is not a positive int, samples that are not (channels, height,
            width), or images too small for the convs (naming both shapes).
    """
    name = name or f"cnn2d-w{width}"
    _check_width(name, width)
    shape = _sample_shape(input_shape)
    if len(shape) != 3:
        raise HostError(
            f"host preset {name!r} is a 2D CNN over images [channels, height, width] (its default input is "
            f"(1, 28, 28)), but the task's samples have shape {shape}. Use an image task (mnist5k-img), or an "
            f"mlp-w<width> or cnn1d-w<width> preset for this task."
        )
    if min(shape[1:]) < 2:
        raise HostError(
            f"host preset {name!r} (two 3x3 convs, stride 2; its default input is (1, 28, 28)) needs images of at "
            f"least 2 x 2 pixels, but the task's samples have shape {shape}."
        )
    return cnn2d((width, width), (3, 3), image_shape=shape, n_classes=n_classes, name=name)


HOST_PRESETS: dict[str, functools.partial] = {
    "mlp-impaired": functools.partial(mlp_preset, (16,), name="mlp-impaired"),
    "mlp-impaired-deep": functools.partial(mlp_preset, (8, 8), name="mlp-impaired-deep"),
    "mlp-paper": functools.partial(mlp_preset, (100, 100), name="mlp-paper"),
    "cnn-impaired": functools.partial(cnn1d_preset, (4, 4), (5, 3), name="cnn-impaired"),
    "cnn-paper": functools.partial(cnn1d_preset, (25, 25, 25), (5, 3, 3), name="cnn-paper"),
    "transformer-small": functools.partial(transformer_preset, name="transformer-small"),
    # Families for the growth benchmark, any task shape, width as a parameter (docs/bench.md "Hosts").
    **{f"mlp-w{w}": functools.partial(mlp_width_preset, w, name=f"mlp-w{w}") for w in (4, 8, 16, 32, 64)},
    **{f"cnn1d-w{w}": functools.partial(cnn1d_width_preset, w, name=f"cnn1d-w{w}") for w in (4, 8, 16)},
    **{f"cnn1d-shallow-w{w}": functools.partial(cnn1d_width_preset, w, layers=1, name=f"cnn1d-shallow-w{w}")
       for w in (4, 8, 16)},
    **{f"cnn2d-w{w}": functools.partial(cnn2d_width_preset, w, name=f"cnn2d-w{w}") for w in (4, 8, 16)},
}
"""Built-in host presets: name -> builder taking ``input_shape`` and ``n_classes`` (see `hosts`).

Other widths: call the builder (``mlp_width_preset(12, input_shape=..., n_classes=...)``), or add
``HOST_PRESETS["mlp-w12"] = functools.partial(mlp_width_preset, 12, name="mlp-w12")`` so that configs
and the CLI can name it."""


_WIDTH_FAMILIES: dict[str, functools.partial] = {
    "mlp": functools.partial(mlp_width_preset),
    "cnn1d": functools.partial(cnn1d_width_preset),
    "cnn1d-shallow": functools.partial(cnn1d_width_preset, layers=1),
    "cnn2d": functools.partial(cnn2d_width_preset),
}


def _width_family(name: str) -> tuple[functools.partial, int] | None:
    """``("mlp-w12")`` -> (the family's builder, 12), or None for a name of no width family."""
    family, sep, width = name.rpartition("-w")
    if not sep or family not in _WIDTH_FAMILIES or not width.isdigit() or int(width) < 1:
        return None
    return _WIDTH_FAMILIES[family], int(width)


def is_preset(name: str) -> bool:
    """Whether `preset` builds `name`: a registered preset, or any width of a width family."""
    return name in HOST_PRESETS or _width_family(name) is not None


def preset(name: str, *, input_shape: Sequence[int] | None = None, n_classes: int | None = None) -> Host:
    """Build the host preset `name` for a task's sample shape and class count.

    ``preset("mlp-impaired", input_shape=(64,), n_classes=10)`` is the impaired MLP for sklearn's
    digits (64-16-10); without arguments a preset has MNIST-1D's shapes ((40,), 10 classes).

    Args:
        name: a key of `HOST_PRESETS` ("mlp-impaired", "cnn-impaired", ...), or any width of the
            width families: "mlp-w<W>", "cnn1d-w<W>", "cnn1d-shallow-w<W>", "cnn2d-w<W>" (W >= 1).
        input_shape: the shape of one sample (`esper_fn.tasks.Task.input_shape`).
        n_classes: the number of classes (`Task.n_classes`).

    Raises:
        HostError: an unknown name (listing the presets), or a host that cannot take samples of
            `input_shape` (naming both shapes).
    """
    if name not in HOST_PRESETS:
        family = _width_family(name)
        if family is None:
            raise HostError(f"unknown host preset {name!r}; the presets are {sorted(HOST_PRESETS)}, and any width of the "
                            "families mlp-w<W>, cnn1d-w<W>, cnn1d-shallow-w<W>, cnn2d-w<W>.")
        builder, width = family
        kwargs = {}
        if input_shape is not None:
            kwargs["input_shape"] = tuple(input_shape)
        if n_classes is not None:
            kwargs["n_classes"] = n_classes
        return builder(width, name=name, **kwargs)
    kwargs: dict[str, Any] = {}
    if input_shape is not None:
        kwargs["input_shape"] = tuple(input_shape)
    if n_classes is not None:
        if not isinstance(n_classes, int) or n_classes < 1:
            raise HostError(f"n_classes must be a positive int, got {n_classes!r}.")
        kwargs["n_classes"] = n_classes
    return HOST_PRESETS[name](**kwargs)
