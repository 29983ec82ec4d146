"""Tezzeret: blueprints to measured, compiled kernels.

Two services, both opt-in; eager `esper_fn.train_step` stays the default and the reference.

**Compiled train steps.** `KernelCache` holds `torch.compile`d train steps, one per *step key*: the
state's structure (`esper_fn.structure`: host, optimizer, blueprint per slot, tensor keys and shapes)
plus its role signature (which slots are live, incubating or idle on some host: `make_plan`), the
step's options and the batch's shapes. A kernel is a pure function of tensors; the Python work of a
step (which seeds run, which leaves train, which hosts are masked) is decided once per key, when the
kernel is built. Kernels are built only by `KernelCache.prepare`, never by `KernelCache.step`: a
step whose key has no kernel runs eagerly (`train_step`) and counts as a miss.
`esper_fn.training.train_epoch(..., kernels=)` (and `train_epochs`) prepares at the start of the epoch, so a germinate, fossilize or prune between epochs (or a blend
that makes a seed live at a tick) switches kernels there, compiling each structure once, and nothing
compiles in the middle of an epoch. Stages and alphas change only between epochs, so the key is
fixed within one.

The cache is bounded by bytes, not by count: each kernel is charged what its compilation measurably
kept (resident memory after compiling and one call, after a garbage collection, and at least the
size of the code it generated), and the least recently used kernels are evicted past `max_bytes`.
`KernelCache.stats` counts hits, misses, compiles and evictions. Every kernel gets its own code
object, so dynamo's per-function recompile limit never applies and an evicted kernel's compiled code
goes with it. Kernels live in memory only: torch's on-disk FX graph cache (which pickles) is switched
off while they compile. By default 1-D convolutions are lowered to loops that inductor
fuses (``conv="loops"``) rather than left as oneDNN calls: the small convolutions of conv seeds,
vmapped over stacked hosts, are where eager steps spend their time (docs/benchmarks.md).

**Characterisation.** `characterise(blueprint, spec)` measures a seed design at a slot shape on this
machine: its parameters (``param_delta``), its forward FLOPs per sample counted by
`torch.utils.flop_counter` (``flop_delta``: matmuls and convolutions; elementwise work is not
counted), and the medians of its forward and train-step latency on a batch (``forward_ms``,
``expected_latency_ms``: forward, backward to its parameters and its input, and an Adam update).
Results are cached in a JSON file per machine, torch version and thread count
(`cache_path`), so a controller can read a seed's costs (`seed_costs`) without measuring again.
``esper-fn blueprints --measure`` prints the table.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import os
import platform
import statistics
import time
import types
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from . import _blueprint as bpm
from ._apply import INCUBATION, make_plan, slot_view, stepped, update_masks, per_host_loss, step_loss, train_step
from ._errors import BlueprintError, CompileError, ConfigError
from ._host import Host, SlotSpec
from ._state import Key, State, structure

__all__ = [
    "DEFAULT_HOSTS",
    "Characterisation",
    "KernelCache",
    "KernelInfo",
    "KernelStats",
    "cache_path",
    "characterise",
    "characterise_catalogue",
    "seed_costs",
    "step_key",
]

DEFAULT_HOSTS: tuple[str, ...] = ("mlp-impaired", "cnn-impaired")
"""The hosts `esper-fn blueprints --measure` measures at by default (MNIST-1D shapes)."""

_MiB = 1 << 20


# ============================================================================ compiled train steps


class _View(NamedTuple):
    """What the forward helpers of `esper_fn._apply` read from a state, built from tensors inside a
    kernel (a NamedTuple, which dynamo traces through)."""

    host: Host
    batch: tuple[int, ...]
    buffers_flat: dict[Key, Tensor]
    slots: dict[str, Tensor]


class KernelStats(BaseModel):
    """Counters of a `KernelCache`.

    Attributes:
        hits: steps that ran a cached kernel.
        misses: steps that found no kernel for their key and ran eagerly.
        compiles: kernels built (`prepare` of a new key).
        evictions: kernels dropped to stay within `max_bytes`.
        entries: kernels held now; bytes: what they are charged, in total.
        max_bytes: the bound.
        compile_seconds: time spent building kernels (compile and first call), in total.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    hits: int
    misses: int
    compiles: int
    evictions: int
    entries: int
    bytes: int
    max_bytes: int
    compile_seconds: float


class KernelInfo(BaseModel):
    """What `KernelCache.prepare` did for one key.

    Attributes:
        compiled: a kernel was built now (False: it was already cached).
        cached: the kernel is in the cache after the call (False when it alone exceeds `max_bytes`).
        seconds: time to build it (compile and first call); 0 when it was cached.
        bytes: what it is charged.
        evicted: kernels evicted to make room.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    compiled: bool
    cached: bool
    seconds: float
    bytes: int
    evicted: int


@dataclass(frozen=True, eq=False)
class _Kernel:
    fn: Callable  # (train, frozen, bufs, opt, stage, alpha, masks, x, y) -> outputs
    keys: tuple[Key, ...]  # trained parameter keys, in the order of `train`
    frozen_keys: tuple[Key, ...]
    buffer_keys: tuple[Key, ...]
    mask_keys: tuple[Key, ...]
    shadow: bool
    nbytes: int = 0


def step_key(state: State, x: Tensor, y: Tensor, *, incubation: str = "shadow", loss_fn: Callable = F.cross_entropy,
             aux_weight: float = 1e-2, grad_stats: bool = False, with_output: bool = False) -> Hashable:
    """The key a kernel is cached under: the state's structure, its role signature (slots live,
    incubating or idle per host), the step's options and the batch's shapes and dtypes.
    States that share a key run the same kernel; stages and alphas are inputs, not part of it,
    except through the roles they give."""
    if incubation not in INCUBATION:
        raise ConfigError(f"incubation must be one of {INCUBATION}, got {incubation!r}.")
    cached = state._cache.get("tezzeret")
    if cached is not None and cached[0] is state.slots:
        base = cached[1]
    else:
        base = (structure(state), make_plan(state).slot_roles)
        state._cache["tezzeret"] = (state.slots, base)
    return (base, incubation, loss_fn, float(aux_weight), bool(grad_stats), bool(with_output),
            tuple(x.shape), x.dtype, tuple(y.shape), y.dtype)


def _build(state: State, *, incubation: str, loss_fn: Callable, aux_weight: float, grad_stats: bool,
           with_output: bool) -> _Kernel:
    """The pure train step for `state`'s key (uncompiled). Mirrors `esper_fn.train_step`: the same
    forward helpers, trainable keys, shadow forward and per-host masks; gradients by `torch.func.grad`
    and the optimizer's own update (`Optimizer.update_lists`, the eager step's, on fresh tensors)."""
    plan = make_plan(state)
    shadow = incubation == "shadow" and bool(plan.incubating)
    keys = plan.trainable(shadow)
    key_set = set(keys)
    frozen_keys = tuple(k for k in state.params_flat if k not in key_set)
    buffer_keys = tuple(state.buffers_flat)
    mask_keys = tuple(k for k in keys if k in update_masks(state, plan, shadow))
    host, batch, opt = state.host, state.batch, state.optimizer
    mirrors = opt.mirrors
    batched = bool(batch)
    lf = per_host_loss(loss_fn, batched)
    nb = len(batch)

    def step(train, frozen, bufs, opt_states, stage, alpha, masks, x, y):
        base = dict(zip(frozen_keys, frozen))
        view = _View(host, batch, dict(zip(buffer_keys, bufs)), {"stage": stage, "alpha": alpha})

        def loss(leaves):
            params = dict(base)
            params.update(zip(keys, leaves))
            total, parts, hb, sb = step_loss(view, plan, params, x, y, lf, aux_weight, shadow)
            extra = {"loss": parts["loss"], "hb": hb, "sb": sb}  # only tensors: torch.func.grad's aux
            if with_output:
                extra["output"] = parts["output"]
            if shadow:
                extra["shadow_loss"] = parts["shadow_loss"]
            return total, extra

        grads, extra = torch.func.grad(loss, has_aux=True)(list(train))
        hb, sb = extra["hb"], extra["sb"]
        new_p, new_s = opt.update_lists(keys, list(train), list(grads), opt_states)
        for k, m in zip(mask_keys, masks):  # hosts whose seed does not train this step keep it
            j = keys.index(k)
            new_p[j] = torch.where(m.view(m.shape + (1,) * (new_p[j].dim() - m.dim())), new_p[j], train[j])
            for name in mirrors:
                old = opt_states[name][j]
                new_s[name][j] = torch.where(m.view(m.shape + (1,) * (old.dim() - m.dim())), new_s[name][j], old)
        metrics = {k: extra[k].detach() for k in ("loss", "output", "shadow_loss") if k in extra}
        if grad_stats:
            metrics["grad_sq"] = torch.stack([g.square().flatten(nb).sum(-1) for g in grads], -1)
        return new_p, new_s, hb, sb, metrics

    return _Kernel(step, keys, frozen_keys, buffer_keys, mask_keys, shadow)


def _rss() -> int:
    """Resident memory of this process in bytes (Linux), or 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only: return freed heap pages to the OS
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _code_modules() -> set[int]:
    """Ids of the Python modules inductor has generated so far."""
    from torch._inductor.codecache import PyCodeCache

    return {id(m) for m in PyCodeCache.modules}


def _code_bytes(before: set[int]) -> int:
    """Bytes of the source files of the modules inductor generated since `before`."""
    from torch._inductor.codecache import PyCodeCache

    total = 0
    for mod in PyCodeCache.modules:
        path = getattr(mod, "__file__", None)
        if id(mod) not in before and path and os.path.exists(path):
            total += os.path.getsize(path)
    return total


def _conv1d_plain(weight: Tensor, dilation, transposed) -> bool:
    return weight.dim() == 3 and list(dilation) == [1] and not transposed


def _conv1d_as_loops(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    """`aten.convolution` of a 1-D convolution (any stride, padding and groups; no dilation) as a
    broadcast multiply and a sum over (input channel, tap), which inductor fuses into one loop nest.
    Other convolutions keep the library call (NotImplemented)."""
    if not _conv1d_plain(weight, dilation, transposed):
        return NotImplemented
    b = x.shape[0]
    c_out, c_in_g, k = weight.shape
    g, p, st = groups, padding[0], stride[0]
    u = F.pad(x, (p, p)).unfold(-1, k, st)  # [B, C_in, L_out, k], a view
    n = u.shape[2]
    out = (u.reshape(b, g, 1, c_in_g, n, k) * weight.reshape(1, g, c_out // g, c_in_g, 1, k)).sum((3, 5))
    out = out.reshape(b, c_out, n)
    return out if bias is None else out + bias.reshape(1, c_out, 1)


def _spread(t: Tensor, s: int) -> Tensor:
    """[..., n] -> [..., (n - 1) * s + 1]: the values s apart, zeros between (a strided scatter as
    views and a concatenation, which inductor fuses)."""
    if s == 1:
        return t
    z = t.new_zeros(*t.shape, s - 1)
    return torch.cat([t.unsqueeze(-1), z], -1).flatten(-2)[..., : (t.shape[-1] - 1) * s + 1]


def _conv1d_backward_as_loops(grad, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
                              groups, mask):
    """`aten.convolution_backward` for the convolutions `_conv1d_as_loops` handles: input gradient
    by scattering every tap back to its input position (k shifted, spread copies summed), weight
    gradient as a reduction over batch and positions, bias gradient as a sum."""
    if not _conv1d_plain(weight, dilation, transposed):
        return NotImplemented
    b, c_in, length = x.shape
    c_out, c_in_g, k = weight.shape
    g, p, st = groups, padding[0], stride[0]
    n = grad.shape[-1]
    go = grad.reshape(b, g, c_out // g, 1, n, 1)
    gi = gw = gb = None
    if mask[0]:
        t = (go * weight.reshape(1, g, c_out // g, c_in_g, 1, k)).sum(2).reshape(b, c_in, n, k)
        padded, span = length + 2 * p, (n - 1) * st + 1
        gi = sum(F.pad(_spread(t[..., j], st), (j, padded - span - j)) for j in range(k))[..., p:p + length]
    if mask[1]:
        u = F.pad(x, (p, p)).unfold(-1, k, st).reshape(b, g, 1, c_in_g, n, k)
        gw = (go * u).sum((0, 4)).reshape(c_out, c_in_g, k)
    if mask[2]:
        gb = grad.sum((0, 2))
    return gi, gw, gb


def _inductor_conv_loops(gm, example_inputs):
    """Inductor with 1-D convolutions lowered to fused loops instead of oneDNN calls (whose backward
    dominates the small convolutions seeds use, vmapped over stacked hosts: docs/benchmarks.md)."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    aten = torch.ops.aten
    table = dict(select_decomp_table())
    table[aten.convolution.default] = _conv1d_as_loops
    table[aten.convolution_backward.default] = _conv1d_backward_as_loops
    return compile_fx(gm, example_inputs, decompositions=table)


class KernelCache:
    """Compiled train steps keyed by `step_key`, bounded by bytes, evicted least recently used.

    Args:
        max_bytes: the most the kept kernels may be charged in total (default 512 MiB).
        compile: compile kernels with `torch.compile` (the default). With False the cache holds the
            uncompiled pure steps: same keys, same outputs, for testing the cache without a compiler.
        conv: "loops" (the default) lowers 1-D convolutions (no dilation) to loops inductor fuses with
            their neighbours; "library" keeps inductor's call to the oneDNN kernel. (On this kind of
            CPU "loops" made 16 stacked conv-seeded hosts ~4x faster: docs/benchmarks.md.)
        backend, mode: passed to `torch.compile` ("inductor"; None is its default mode). A backend
            other than "inductor" ignores `conv`.
        sizer: ``sizer(key) -> bytes`` overriding the measured charge (for tests).

    Not thread-safe: one cache per training loop.
    """

    def __init__(self, max_bytes: int = 512 * _MiB, *, compile: bool = True, conv: str = "loops",
                 backend: str = "inductor", mode: str | None = None, sizer: Callable[[Hashable], int] | None = None):
        if max_bytes <= 0:
            raise ConfigError(f"max_bytes must be > 0, got {max_bytes}.")
        if conv not in ("loops", "library"):
            raise ConfigError(f"conv must be 'loops' or 'library', got {conv!r}.")
        if mode is not None and conv == "loops" and backend == "inductor":
            raise ConfigError(f"mode={mode!r} needs conv='library' (the loop lowering runs inductor's default mode).")
        self.conv = conv
        self.max_bytes = int(max_bytes)
        self.compile = compile
        self.backend = backend
        self.mode = mode
        self._sizer = sizer
        self._kernels: OrderedDict[Hashable, _Kernel] = OrderedDict()
        self._counts = {"hits": 0, "misses": 0, "compiles": 0, "evictions": 0}
        self._compile_seconds = 0.0
        self._serial = 0

    @property
    def stats(self) -> KernelStats:
        return KernelStats(**self._counts, entries=len(self._kernels), bytes=sum(k.nbytes for k in self._kernels.values()),
                           max_bytes=self.max_bytes, compile_seconds=self._compile_seconds)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._kernels

    def __len__(self) -> int:
        return len(self._kernels)

    def clear(self) -> None:
        """Drop every kernel (counters are kept)."""
        self._kernels.clear()
        _trim()

    def prepare(self, state: State, x: Tensor, y: Tensor, *, incubation: str = "shadow",
                loss_fn: Callable = F.cross_entropy, aux_weight: float = 1e-2, grad_stats: bool = False,
                with_output: bool = False) -> KernelInfo:
        """Make sure a kernel for `state`'s key exists, building (and compiling) it now if not.

        Call it where a compile may happen: before an epoch, after a lifecycle op. The kernel runs
        once on `state`, `x`, `y` to compile; its result is discarded (`state` is not changed).

        Raises:
            CompileError: `torch.compile` failed for this structure (the message names it).
        """
        key = step_key(state, x, y, incubation=incubation, loss_fn=loss_fn, aux_weight=aux_weight,
                       grad_stats=grad_stats, with_output=with_output)
        if key in self._kernels:
            self._kernels.move_to_end(key)
            return KernelInfo(compiled=False, cached=True, seconds=0.0, bytes=self._kernels[key].nbytes, evicted=0)
        if self.compile:  # the compiler's own modules are not the kernel's memory: load them first
            import torch._inductor.compile_fx  # noqa: F401
        _trim()
        rss0, code0 = _rss(), _code_modules() if self.compile else set()
        t0 = time.perf_counter()
        kernel = _build(state, incubation=incubation, loss_fn=loss_fn, aux_weight=aux_weight, grad_stats=grad_stats,
                        with_output=with_output)
        fn = kernel.fn
        if self.compile:
            self._serial += 1
            # A code object of its own: dynamo caches compiled code per code object, so kernels
            # never share (or exhaust) one function's recompile budget, and an evicted kernel's
            # compiled code is freed with its code object.
            code = fn.__code__.replace(co_name=f"tezzeret_step_{self._serial}")
            backend = _inductor_conv_loops if self.backend == "inductor" and self.conv == "loops" else self.backend
            fn = torch.compile(types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__),
                               backend=backend, mode=self.mode, dynamic=False, fullgraph=False)
        kernel = _Kernel(fn, kernel.keys, kernel.frozen_keys, kernel.buffer_keys, kernel.mask_keys, kernel.shadow)
        try:
            from torch._inductor import config as inductor_config

            with inductor_config.patch(fx_graph_cache=False):
                self._call(kernel, state, x, y)
        except (RuntimeError, AssertionError, NotImplementedError, TypeError) as e:
            if not self.compile:
                raise
            raise CompileError(f"compiling the train step for blueprints {state.blueprints} on host "
                               f"{state.host.name!r} (batch {state.batch}) failed: {type(e).__name__}: {e}. Train this "
                               "structure eagerly (`esper_fn.train_step`).") from e
        seconds = time.perf_counter() - t0
        self._compile_seconds += seconds
        self._counts["compiles"] += 1
        if self._sizer is not None:
            nbytes = int(self._sizer(key))
        else:
            _trim()
            nbytes = max(_rss() - rss0, _code_bytes(code0) if self.compile else 0, 1)
        kernel = _Kernel(kernel.fn, kernel.keys, kernel.frozen_keys, kernel.buffer_keys, kernel.mask_keys,
                         kernel.shadow, nbytes)
        self._kernels[key] = kernel
        evicted = 0
        while self._kernels and sum(k.nbytes for k in self._kernels.values()) > self.max_bytes:
            self._kernels.popitem(last=False)
            self._counts["evictions"] += 1
            evicted += 1
        if evicted:
            _trim()
        return KernelInfo(compiled=True, cached=key in self._kernels, seconds=seconds, bytes=nbytes, evicted=evicted)

    def _call(self, kernel: _Kernel, state: State, x: Tensor, y: Tensor):
        pf, opt = state.params_flat, state.opt_flat
        masks = update_masks(state, make_plan(state), kernel.shadow)
        alpha, _, stage = slot_view(state)  # the slot records on the state's device (cached)
        return kernel.fn(
            [pf[k] for k in kernel.keys], [pf[k] for k in kernel.frozen_keys],
            [state.buffers_flat[k] for k in kernel.buffer_keys],
            {m: [opt[(m,) + k] for k in kernel.keys] for m in state.optimizer.mirrors},
            stage, alpha, [masks[k] for k in kernel.mask_keys], x, y)

    def step(self, state: State, x: Tensor, y: Tensor, *, incubation: str = "shadow",
             loss_fn: Callable = F.cross_entropy, aux_weight: float = 1e-2, grad_stats: bool = False,
             with_output: bool = False) -> tuple[State, dict[str, Tensor]]:
        """`esper_fn.train_step` through the cached kernel for `state`'s key; eagerly (a miss)
        when there is none. Never compiles. Same arguments and results as `train_step` (metrics:
        "loss", and "output", "shadow_loss", "grad_sq" as asked); parameters agree with the eager
        step within float rounding."""
        key = step_key(state, x, y, incubation=incubation, loss_fn=loss_fn, aux_weight=aux_weight,
                       grad_stats=grad_stats, with_output=with_output)
        kernel = self._kernels.get(key)
        if kernel is None:
            self._counts["misses"] += 1
            return train_step(state, x, y, loss_fn=loss_fn, incubation=incubation, aux_weight=aux_weight,
                              grad_stats=grad_stats, with_output=with_output)
        self._counts["hits"] += 1
        self._kernels.move_to_end(key)
        new_p, new_s, hb, sb, metrics = self._call(kernel, state, x, y)
        return stepped(state, kernel.keys, new_p, new_s, hb, sb), metrics


# ============================================================================ characterisation


class Characterisation(BaseModel):
    """A blueprint measured at one slot shape on this machine.

    Attributes:
        blueprint: the blueprint id.
        host, slot: where the slot shape came from (any slot with the same spec gets the same numbers).
        slot_kind, slot_shape: the slot's layout and per-sample shape.
        param_delta: trainable parameters the seed adds (counted from its initial tensors).
        flop_delta: FLOPs per sample of the seed's forward, counted by `torch.utils.flop_counter`
            (matmuls, convolutions and similar; elementwise work is not counted, so a seed that only
            scales or normalises counts 0).
        flops_declared: the design's own estimate, ``blueprint.flops(spec)`` (multiply-adds).
        forward_ms: median forward latency of the seed alone on a batch of `batch_size`.
        expected_latency_ms: median train-step latency of the seed alone on that batch: forward,
            backward (to its parameters and to the slot tensor, as inside a host) and an Adam update.
            What the seed adds to a host's step, to first order.
        batch_size, repeats, threads: how it was measured.
        machine, torch_version: where.
        cached: read from the cache rather than measured now (not stored).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    blueprint: str
    host: str
    slot: str
    slot_kind: str
    slot_shape: list[int]
    param_delta: int
    flop_delta: int
    flops_declared: int
    forward_ms: float
    expected_latency_ms: float
    batch_size: int
    repeats: int
    threads: int
    machine: str
    torch_version: str
    cached: bool = False


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "arch": platform.machine(), "cpus": os.cpu_count(), "system": platform.system(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def _machine_key(machine: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The characterisation cache of this machine, torch version and thread count:
    ``<cache_dir>/tezzeret/characterisation-<16 hex>.json``, where `cache_dir` defaults to
    ``$ESPER_FN_CACHE`` or ``~/.cache/esper_fn``."""
    base = Path(cache_dir or os.environ.get("ESPER_FN_CACHE") or Path.home() / ".cache" / "esper_fn")
    return base / "tezzeret" / f"characterisation-{_machine_key(_machine())}.json"


def _spec_key(bp_id: str, spec: SlotSpec, batch_size: int) -> str:
    fields = [spec.kind, list(spec.shape), spec.layer_type, list(spec.in_shape) if spec.in_shape else None,
              spec.consumer_out, spec.activation, str(spec.dtype)]
    return json.dumps([bp_id, fields, batch_size])


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError):
        return {}  # an unreadable cache is only a cache: measure again and rewrite it
    return data.get("entries", {}) if isinstance(data, dict) else {}


def _write_cache(path: Path, new: dict[str, Any]) -> None:
    """Merge `new` into the cache file under a lock and replace it atomically."""
    with _locked(path):
        entries = _read_cache(path)
        entries.update(new)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"machine": _machine(), "entries": entries}, indent=1))
        os.replace(tmp, path)


def _median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _measure(bp: bpm.Blueprint, spec: SlotSpec, batch_size: int, repeats: int) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    from .optim import adam, zero_leaf

    g = torch.Generator().manual_seed(0)
    p, b = bp.init(spec, g)
    # Non-zero weights, so no kernel takes a shortcut on zeros.
    p = {k: (torch.randn(v.shape, generator=g) * 0.1 if v.is_floating_point() else v) for k, v in p.items()}
    h = torch.randn(batch_size, *spec.shape, generator=g)
    x_in = torch.randn(batch_size, *spec.in_shape, generator=g) if spec.in_shape else None
    allp = {**p, **b}

    def fwd(hh=h, pp=allp, xi=x_in, train=True):
        out = bp.apply(pp, hh, xi, spec, train)
        return out.delta if isinstance(out, bpm.SeedOut) else out

    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            fwd(h[:1], allp, x_in[:1] if x_in is not None else None)
    flops = int(counter.get_total_flops())
    with torch.no_grad():
        fwd_ms = _median_ms(fwd, repeats)
    opt = adam(1e-3)
    keys = [("seeds", k) for k in p]
    names = list(p)
    state = {m: [zero_leaf(m, p[n]) for n in names] for m in opt.mirrors}
    hg = h.clone().requires_grad_()
    r = torch.randn(fwd().shape, generator=g)

    def train():
        leaves = [p[n].detach().requires_grad_() for n in names]
        out = fwd(hg, {**dict(zip(names, leaves)), **b})
        if not out.requires_grad:  # a design with no trainable path (a tap): the step is its forward
            return
        grads = torch.autograd.grad((out * r).sum(), [*leaves, hg], allow_unused=True)
        grads = [torch.zeros_like(v) if gr is None else gr for v, gr in zip(leaves, grads[:len(leaves)])]
        opt.update_lists(keys, [p[n] for n in names], grads, state)

    step_ms = _median_ms(train, repeats)
    return {"param_delta": sum(int(v.numel()) for v in p.values()), "flop_delta": flops,
            "flops_declared": int(bp.flops(spec)), "forward_ms": fwd_ms, "expected_latency_ms": step_ms}


def characterise(blueprint: str | bpm.Blueprint, spec: SlotSpec, *, host: str = "", batch_size: int = 100,
                 repeats: int = 30, refresh: bool = False, cache_dir: str | os.PathLike | None = None) -> Characterisation:
    """Measure `blueprint` at `spec` on this machine (or read the cached measurement).

    Args:
        blueprint: id, bare name or `Blueprint`.
        spec: the slot (its kind, shape, layer type and neighbours; the name is not part of the key).
        host: a label for where the slot shape came from (recorded only).
        batch_size: the batch the latencies are measured on.
        repeats: timed repeats per latency (median).
        refresh: measure even if cached.
        cache_dir: see `cache_path`.

    Raises:
        BlueprintError: unknown blueprint, or it does not fit `spec`.
    """
    return _characterise_many([(bpm.get(blueprint), spec, host)], batch_size, repeats, refresh, cache_dir)[0]


def _characterise_many(items, batch_size: int, repeats: int, refresh: bool, cache_dir) -> list[Characterisation]:
    if batch_size < 1 or repeats < 1:
        raise ConfigError(f"batch_size and repeats must be >= 1, got {batch_size} and {repeats}.")
    path = cache_path(cache_dir)
    entries = {} if refresh else _read_cache(path)
    machine = _machine()
    out, new = [], {}
    for bp, spec, host in items:
        why = bp.misfit(spec)
        if why is not None:
            raise BlueprintError(f"characterise: blueprint {bp.id!r} does not fit slot {spec.name!r}: {why}.")
        key = _spec_key(bp.id, spec, batch_size)
        hit = entries.get(key) or new.get(key)
        cached = hit is not None and key not in new
        if hit is None:
            hit = {**_measure(bp, spec, batch_size, repeats), "repeats": repeats}
            new[key] = hit
        out.append(Characterisation(blueprint=bp.id, host=host, slot=spec.name, slot_kind=spec.kind,
                                    slot_shape=list(spec.shape), batch_size=batch_size, threads=machine["threads"],
                                    machine=machine["cpu"], torch_version=machine["torch"], cached=cached, **hit))
    if new:
        _write_cache(path, new)
    return out


def characterise_catalogue(hosts: Sequence[str] = DEFAULT_HOSTS, *, batch_size: int = 100, repeats: int = 30,
                           refresh: bool = False, cache_dir: str | os.PathLike | None = None) -> list[Characterisation]:
    """`characterise` every blueprint available here at every slot of each host preset (built for
    MNIST-1D) that it fits. Slots with the same spec are measured once."""
    from ._host import HOST_PRESETS, preset

    items = []
    caps = bpm.available_capabilities()
    for name in hosts:
        if name not in HOST_PRESETS:
            raise ConfigError(f"unknown host {name!r}; presets are {sorted(HOST_PRESETS)}.")
        h = preset(name)
        for spec in h.slots():
            for bp in bpm.registry().values():
                if bp.fits(spec) and set(bp.meta.requires_capability) <= caps:
                    items.append((bp, spec, name))
    return _characterise_many(items, batch_size, repeats, refresh, cache_dir)


def seed_costs(state: State, *, batch_size: int = 100, repeats: int = 30,
               cache_dir: str | os.PathLike | None = None) -> dict[str, Characterisation]:
    """The measured costs of every seed `state` holds, by slot (measured once per machine, then
    read from the cache): what a controller reads as a seed's ``param_delta``, ``flop_delta`` and
    ``expected_latency_ms``.

    Args:
        state: a single or stacked state.
    """
    items = [(bpm.registry()[bid], state.spec(name), state.host.name)
             for name, bid in zip(state.slot_names, state.blueprints) if bid is not None]
    slots = [name for name, bid in zip(state.slot_names, state.blueprints) if bid is not None]
    return dict(zip(slots, _characterise_many(items, batch_size, repeats, False, cache_dir)))
