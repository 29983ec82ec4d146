"""Functional optimizers built from composable gradient transforms (Optax-style).

**Transforms.** A `Transform` is a pure pair ``(init, update)`` plus the names of the state *mirrors* it
owns. It works on flat lists of leaves (the parameters of one update, in one order):

- ``init(params) -> {mirror: [zero tensor per leaf]}``;
- ``update(updates, state, params, ctx) -> (new_updates, new_state)``: `updates` is the list of
  gradients (or of what the previous transform made of them), `state` holds this transform's mirrors,
  `ctx` (`Context`) what every transform of the update shares: each leaf's group ("host" or "seeds"),
  each leaf's step count, whether the tensors are donated, and how to run the elementwise ops.

The pieces, each the rule of `torch.optim`:

- `scale_by_adam(b1, b2, eps)`: mirrors "mu", "nu": ``m / (sqrt(v) + eps)`` with both moments
  bias-corrected by the leaf's step count; ``1 - beta ** step`` is computed as
  ``-expm1(step * log(beta))`` in the parameters' dtype (at least float32), which does not cancel in
  float32, per leaf and, for N stacked hosts, per host (counts of shape [N]).
- `add_decayed_weights(wd)`: ``u + wd * p``. Before `scale_by_adam` this is the L2 penalty in the
  gradient (`torch.optim.Adam`'s and `SGD`'s ``weight_decay``); after it, decoupled weight decay
  (`torch.optim.AdamW`'s): the position in the chain is the semantics, as in Optax.
- `trace(momentum, nesterov)`: mirror "momentum": SGD's momentum buffer (dampening 0) and Nesterov.
- `scale_by_learning_rate(lr)`: ``-lr * u``, with one rate per group (``{"host": 1e-2, "seeds": 3e-3}``).
- `chain(*transforms)`: runs them in order; its state is the union of theirs (each mirror owned once).

and `apply_updates(params, updates, ctx)` adds the result to the parameters. So

    adam(lr, wd)  = chain(add_decayed_weights(wd), scale_by_adam(b1, b2, eps), scale_by_learning_rate(lr))
    adamw(lr, wd) = chain(scale_by_adam(b1, b2, eps), add_decayed_weights(wd), scale_by_learning_rate(lr))
    sgd(lr, ...)  = chain(add_decayed_weights(wd), trace(momentum, nesterov), scale_by_learning_rate(lr))

(a zero weight decay or momentum leaves its piece out).

**Optimizers.** `adam`, `adamw` and `sgd` return an `Optimizer`: the chain plus its description
(`name`, `lr`, `mirrors`, `hyper`), which is what checkpoints store and `Optimizer(name, lr, mirrors,
hyper)` rebuilds. Its state is a `TensorDict` of mirrors: each top-level entry ("step", "mu", "nu",
"momentum") has exactly the keys of the parameter tree. "step" is the optimizer's own: a float32
count per leaf (0-d; [N] for N stacked hosts), incremented once per update and handed to the
transforms in `Context.step`, so a seed grafted later starts its own bias correction at zero. Every
other mirror holds a tensor shaped like its parameter. Lifecycle ops (germinate, fossilize, prune) edit
every mirror together with the parameters; `zero_leaf` is the rule they use for new leaves.

**One rule, eager and compiled.** `esper_fn.train_step` (through `Optimizer.update_lists`) and
Tezzeret's compiled kernels run the same update. Each elementwise op runs over all leaves at once as a
``torch._foreach_*`` op (torch.optim's foreach path; `torch.compile` lowers them), or with
``foreach=False`` one op per leaf (what `torch.vmap` can batch: foreach ops have no batching rule).
Both give bit-identical results. No value of a tensor is read in Python, so nothing synchronises or
breaks a graph. Fresh tensors are written and the inputs are left alone, unless the caller donates its
tensors (``donate=True``: it never uses them again), in which case parameters and state are updated in
place.

Learning rates may differ between the host and the seeds: pass ``lr={"host": 1e-2, "seeds": 3e-3}``.

Cost: about what ``torch.optim.Adam(foreach=True)`` costs, roughly twice the private fused kernel the
eager step used before on small trees (small MLPs' train steps +17-40%, 16 stacked hosts +2-12%:
docs/benchmarks.md); in exchange the same rule compiles, vmaps and runs in Tezzeret's kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import torch
from tensordict import TensorDict
from torch import Tensor

from ._errors import ConfigError

__all__ = [
    "Context",
    "Optimizer",
    "Transform",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "scale_by_adam",
    "scale_by_learning_rate",
    "sgd",
    "trace",
    "zero_leaf",
]

Key = tuple[str, ...]
GROUPS = ("host", "seeds")
Mirrors = dict[str, list[Tensor]]


def zero_leaf(mirror: str, p: Tensor) -> Tensor:
    """The initial optimizer-state leaf of mirror `mirror` for parameter `p`: a 0-d float32 zero on
    `p`'s device for "step" (a count: float32 whatever the parameters' dtype, since a bfloat16 count
    stops at 256; the bias corrections are computed from it in at least float32), zeros like `p` (its
    dtype and device) otherwise."""
    return torch.zeros((), dtype=torch.float32, device=p.device) if mirror == "step" else torch.zeros_like(p)


# ============================================================================ transforms


class Context(NamedTuple):
    """What the transforms of one update share besides their own state.

    Attributes:
        groups: the group of each leaf, "host" or "seeds" (the first element of its key).
        step: every leaf's step count after this update, stacked: float32 [K] for K leaves, or
            [K, N] for N stacked hosts; 1 at a leaf's first update.
        dtype: the leaves' dtype (float64 if they differ), for the constants of the update.
        inplace: the caller donated the parameters and the state: update those tensors in place
            (False: write fresh tensors and leave every input as it was).
        foreach: run each elementwise op over all leaves at once (``torch._foreach_*``); False: one
            op per leaf (under `torch.vmap`). Bit-identical results.
    """

    groups: tuple[str, ...]
    step: Tensor
    dtype: torch.dtype = torch.float32
    inplace: bool = False
    foreach: bool = True


class Transform(NamedTuple):
    """A gradient transform: a pure ``(init, update)`` pair and the state mirrors it owns.

    Attributes:
        init: ``init(params) -> {mirror: [zeros per leaf]}`` for `params`, a list of tensors.
        update: ``update(updates, state, params, ctx) -> (new_updates, new_state)``: `updates`,
            `params` and every list of `state` (``{mirror: list}``, this transform's mirrors) are
            aligned; `ctx` is a `Context`. It never writes into `updates` or `params`, and writes
            into `state`'s tensors only when ``ctx.inplace``.
        mirrors: the names of the state entries it owns (never "step", the optimizer's count).
    """

    init: Callable[[Sequence[Tensor]], Mirrors]
    update: Callable[[list[Tensor], Mirrors, list[Tensor], Context], tuple[list[Tensor], Mirrors]]
    mirrors: tuple[str, ...] = ()


_OPS = ("add", "addcmul", "div", "lerp", "mul", "sqrt")
_FOREACH = {op: (getattr(torch, f"_foreach_{op}"), getattr(torch, f"_foreach_{op}_")) for op in _OPS}


def _each(op: str, xs: list[Tensor], *args: Any, ctx: Context, inplace: bool = False, **kw: Any) -> list[Tensor]:
    """``torch.<op>(x, *a, **kw)`` for every leaf x (in place, ``x.<op>_(...)``, with `inplace`):
    list arguments are taken leaf by leaf, others shared. One ``torch._foreach_<op>`` call over all
    leaves when ``ctx.foreach`` (on CPU it runs the same per-leaf kernels: the same bits)."""
    if ctx.foreach:
        fns = _FOREACH[op]
        if inplace:
            fns[1](xs, *args, **kw)
            return xs
        return list(fns[0](xs, *args, **kw))  # foreach ops return tuples
    cols = [a if isinstance(a, (list, tuple)) else [a] * len(xs) for a in args]
    if inplace:
        for x, *a in zip(xs, *cols):
            getattr(x, op + "_")(*a, **kw)
        return xs
    fn = getattr(torch, op)
    return [fn(x, *a, **kw) for x, *a in zip(xs, *cols)]


_EXACT = (torch.float32, torch.float64)
_CONSTANTS: dict[tuple, Tensor] = {}


def _const(x: float | tuple[float, ...], dtype: torch.dtype, device: torch.device,
           shape: tuple[int, ...] | None = None) -> Tensor | float | tuple[float, ...]:
    """`x` as a constant tensor (0-d for one number; `shape` to view it) of `dtype` on `device`: a
    foreach op takes a 0-d tensor operand without the per-leaf conversion a Python number costs
    (~1 us per leaf on CPU), and the value is the same. Lower-precision dtypes (bfloat16) get the
    Python number(s), which their kernels apply in float32. Cached (never written to); built afresh
    under `torch.compile`, where a constant is free and a global cache would only add guards."""
    if dtype not in _EXACT:
        return x
    if torch.compiler.is_compiling():
        t = torch.tensor(x, dtype=dtype, device=device)
        return t if shape is None else t.view(shape)
    key = (x, dtype, device, shape)
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) > 512:  # learning rates swept over many values
            _CONSTANTS.clear()
        t = torch.tensor(x, dtype=dtype, device=device)
        t = _CONSTANTS[key] = t if shape is None else t.view(shape)
    return t


def _zeros(mirrors: tuple[str, ...], params: Sequence[Tensor]) -> Mirrors:
    return {m: [zero_leaf(m, p) for p in params] for m in mirrors}


def _per_leaf(values: Tensor, params: list[Tensor]) -> list[Tensor]:
    """Rows of `values` ([K], or [K, N] for stacked hosts), one per leaf; a per-host row [N] is
    shaped [N, 1, ...] to broadcast over its leaf, in the leaf's dtype."""
    rows = values.unbind(0)
    if values.dim() == 1:
        return rows  # 0-d: broadcasts without changing a leaf's dtype
    return [r.view(r.shape + (1,) * (p.dim() - 1)).to(p.dtype) for r, p in zip(rows, params)]


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf  # beta 0: bias correction 1 from the first step


def _adam_terms(ctx: Context, params: list[Tensor], logs: tuple[float, float], eps: float):
    """Per leaf, ``a = bc1 / sqrt(bc2)`` and ``b = eps * bc1``, where ``bc = 1 - beta ** step``
    is computed as ``-expm1(step * log(beta))`` (no cancellation in float32: ``1 - 0.999 ** 1``
    directly is off by 1e-5 relative), in the leaves' dtype (at least float32). Then
    ``m / (sqrt(v) * a + b)`` is ``m_hat / (sqrt(v_hat) + eps)``. All leaves in one tensor: a few ops
    in all rather than a few per leaf."""
    step = ctx.step
    dt = ctx.dtype if ctx.dtype in _EXACT else torch.float32
    if step.dtype != dt:
        step = step.to(dt)
    lg = _const(logs, dt, step.device, (2,) + (1,) * step.dim())
    bc1, bc2 = torch.expm1(step * lg).neg_().unbind(0)  # [K] or [K, N] each
    a = bc1 * bc2.rsqrt_()
    return _per_leaf(a, params), _per_leaf(bc1.mul_(eps), params)


def _adam_update(b1: float, b2: float, eps: float, logs: tuple[float, float], updates, state, params, ctx):
    mu = _each("lerp", state["mu"], updates, 1 - b1, ctx=ctx, inplace=ctx.inplace)
    nu = _each("mul", state["nu"], _const(b2, ctx.dtype, ctx.step.device), ctx=ctx, inplace=ctx.inplace)
    # in place only on donated tensors (torch.vmap has no batching rule for addcmul_)
    nu = _each("addcmul", nu, updates, updates, ctx=ctx, inplace=ctx.inplace, value=1 - b2)
    a, b = _adam_terms(ctx, params, logs, eps)
    denom = _each("addcmul", b, _each("sqrt", nu, ctx=ctx), a, ctx=ctx)  # b + sqrt(v) * a
    return _each("div", mu, denom, ctx=ctx), {"mu": mu, "nu": nu}


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Transform:
    """Adam's scaling: ``m_hat / (sqrt(v_hat) + eps)`` (mirrors "mu", "nu").

    ``m = lerp(m, g, 1 - b1)``, ``v = b2 * v + (1 - b2) * g * g``, and the bias corrections
    ``1 - b ** step`` from `Context.step` (per leaf; per host when stacked), as `torch.optim.Adam`.

    Raises:
        ConfigError: a beta outside [0, 1) or a negative eps.
    """
    if not (0 <= b1 < 1 and 0 <= b2 < 1) or eps < 0:
        raise ConfigError(f"scale_by_adam: betas must be in [0, 1) and eps >= 0, got betas ({b1}, {b2}) and eps "
                          f"{eps}. Use the torch.optim defaults (0.9, 0.999), 1e-8 if unsure.")
    mirrors = ("mu", "nu")
    update = partial(_adam_update, float(b1), float(b2), float(eps), (_log(b1), _log(b2)))
    return Transform(partial(_zeros, mirrors), update, mirrors)


def _decay_update(wd: float, updates, state, params, ctx):
    return _each("add", updates, params, ctx=ctx, alpha=wd), {}


def add_decayed_weights(weight_decay: float) -> Transform:
    """``u + weight_decay * p``: L2 in the gradient before `scale_by_adam` (or `trace`), decoupled
    weight decay (AdamW) after it. No state.

    Raises:
        ConfigError: a negative weight decay.
    """
    if weight_decay < 0:
        raise ConfigError(f"add_decayed_weights: weight_decay must be >= 0, got {weight_decay}.")
    return Transform(partial(_zeros, ()), partial(_decay_update, float(weight_decay)))


def _trace_update(momentum: float, nesterov: bool, updates, state, params, ctx):
    buf = _each("mul", state["momentum"], _const(momentum, ctx.dtype, ctx.step.device), ctx=ctx, inplace=ctx.inplace)
    buf = _each("add", buf, updates, ctx=ctx, inplace=ctx.inplace)
    # torch.optim.SGD copies the first gradient into the buffer; it starts at zero, so
    # momentum * 0 + g is that copy (per host when stacked, whatever the other hosts' counts).
    out = _each("add", updates, buf, ctx=ctx, alpha=momentum) if nesterov else buf
    return out, {"momentum": buf}


def trace(momentum: float, nesterov: bool = False) -> Transform:
    """SGD momentum (dampening 0): ``buf = momentum * buf + u``; returns ``buf``, or with Nesterov
    ``u + momentum * buf`` (mirror "momentum"), as `torch.optim.SGD`.

    Raises:
        ConfigError: momentum not > 0 (or not finite).
    """
    if not (momentum > 0 and math.isfinite(momentum)):
        raise ConfigError(f"trace: momentum must be > 0, got {momentum}. Leave `trace` out for plain SGD.")
    mirrors = ("momentum",)
    return Transform(partial(_zeros, mirrors), partial(_trace_update, float(momentum), bool(nesterov)), mirrors)


def _lr_map(lr: float | Mapping[str, float]) -> dict[str, float]:
    if isinstance(lr, Mapping):
        unknown = set(lr) - set(GROUPS)
        if unknown or not lr:
            raise ConfigError(f"lr mapping keys must be among {GROUPS}, got {sorted(lr)}.")
        base = lr.get("host", lr.get("seeds"))
        out = {g: float(lr.get(g, base)) for g in GROUPS}
    else:
        out = {g: float(lr) for g in GROUPS}
    if any(v < 0 or not math.isfinite(v) for v in out.values()):
        raise ConfigError(f"learning rates must be finite and >= 0, got {out}.")
    return out


def _lr_update(rates: dict[str, float], updates, state, params, ctx):
    groups = ctx.groups
    g0 = groups[0]
    dev = ctx.step.device
    if groups.count(g0) == len(groups):
        r = rates.get(g0)
        if r is not None:
            return _each("mul", updates, _const(r, ctx.dtype, dev), ctx=ctx), {}
    try:
        per_leaf = [rates[g] for g in groups]
    except KeyError as e:
        raise ConfigError(f"a leaf of group {e.args[0]!r} has no learning rate; leaf keys start with one of "
                          f"{GROUPS} (the parameter tree's top level).") from None
    return _each("mul", updates, [_const(r, ctx.dtype, dev) for r in per_leaf], ctx=ctx), {}


def scale_by_learning_rate(lr: float | Mapping[str, float]) -> Transform:
    """``-lr * u``, the rate chosen by each leaf's group: one float for all, or
    ``{"host": ..., "seeds": ...}`` (a missing group takes the other's rate). No state.

    Raises:
        ConfigError: unknown group names, or a negative or non-finite rate.
    """
    rates = {g: 0.0 - r for g, r in _lr_map(lr).items()}  # 0.0 - 0.0 is +0.0 (a cached constant's key)
    return Transform(partial(_zeros, ()), partial(_lr_update, rates))


def _chain_init(transforms: tuple[Transform, ...], params: Sequence[Tensor]) -> Mirrors:
    out: Mirrors = {}
    for t in transforms:
        out.update(t.init(params))
    return out


def _chain_update(transforms: tuple[Transform, ...], updates, state, params, ctx):
    new: Mirrors = {}
    for t in transforms:
        updates, s = t.update(updates, {m: state[m] for m in t.mirrors} if t.mirrors else {}, params, ctx)
        if s:
            new.update(s)
    return updates, new


def chain(*transforms: Transform) -> Transform:
    """The transforms applied in order (each one's output is the next one's `updates`); the state is
    the union of theirs.

    Raises:
        ConfigError: two transforms own the same mirror, or one owns "step" (the optimizer's count).
    """
    mirrors = tuple(m for t in transforms for m in t.mirrors)
    dup = sorted({m for m in mirrors if mirrors.count(m) > 1} | ({"step"} & set(mirrors)))
    if dup:
        raise ConfigError(f"chain: mirror(s) {dup} owned twice (or 'step', which the optimizer owns); every "
                          "transform of a chain needs its own state names.")
    return Transform(partial(_chain_init, transforms), partial(_chain_update, transforms), mirrors)


def apply_updates(params: list[Tensor], updates: list[Tensor], ctx: Context) -> list[Tensor]:
    """``p + u`` per leaf (in place on donated parameters, ``ctx.inplace``)."""
    return _each("add", params, updates, ctx=ctx, inplace=ctx.inplace)


# ============================================================================ optimizers


def _adam_recipe(lr: Mapping[str, float], h: Mapping[str, Any], decoupled: bool) -> Transform:
    scale = scale_by_adam(h["beta1"], h["beta2"], h["eps"])
    wd = float(h["weight_decay"])
    decay = [add_decayed_weights(wd)] if wd else []
    pieces = [scale, *decay] if decoupled else [*decay, scale]
    return chain(*pieces, scale_by_learning_rate(lr))


def _sgd_recipe(lr: Mapping[str, float], h: Mapping[str, Any]) -> Transform:
    wd, mom = float(h["weight_decay"]), float(h["momentum"])
    pieces = [add_decayed_weights(wd)] if wd else []
    if mom:
        pieces.append(trace(mom, bool(h["nesterov"])))
    return chain(*pieces, scale_by_learning_rate(lr))


_RECIPES: dict[str, Callable[[Mapping[str, float], Mapping[str, Any]], Transform]] = {
    "adam": partial(_adam_recipe, decoupled=False),
    "adamw": partial(_adam_recipe, decoupled=True),
    "sgd": _sgd_recipe,
}


@dataclass(frozen=True)
class Optimizer:
    """A functional optimizer: a chain of transforms and the description that rebuilds it.

    Attributes:
        name: "adam", "adamw" or "sgd".
        lr: learning rate per group ("host", "seeds").
        mirrors: names of the state mirrors: "step" then the chain's, e.g. ("step", "mu", "nu").
        hyper: the remaining hyperparameters.
        transform: the chain (derived from the four fields above; not compared).

    Raises:
        ConfigError: an unknown name, or mirrors that are not the chain's (e.g. a damaged checkpoint).
    """

    name: str
    lr: Mapping[str, float]
    mirrors: tuple[str, ...]
    hyper: Mapping[str, float | bool]
    transform: Transform = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        recipe = _RECIPES.get(self.name)
        if recipe is None:
            raise ConfigError(f"unknown optimizer {self.name!r}; known: {sorted(_RECIPES)}.")
        t = recipe(self.lr, self.hyper)
        if ("step", *t.mirrors) != tuple(self.mirrors):
            raise ConfigError(f"optimizer {self.name!r} with {dict(self.hyper)} keeps mirrors "
                              f"{('step', *t.mirrors)}, not {tuple(self.mirrors)}. Build it with "
                              f"esper_fn.optim.{self.name}(...).")
        object.__setattr__(self, "transform", t)

    def init(self, params: TensorDict) -> TensorDict:
        """Optimizer state for `params` (a TensorDict): every mirror with zeros.

        Returns:
            TensorDict ``{mirror: TensorDict with params' keys}``.
        """
        out = TensorDict()
        for m in self.mirrors:
            sub = TensorDict()
            for k, p in params.items(True, True):
                sub.set(k, zero_leaf(m, p))
            out.set(m, sub)
        return out

    def update(self, grads: TensorDict, opt_state: TensorDict, params: TensorDict, *,
               foreach: bool = True) -> tuple[TensorDict, TensorDict]:
        """One step over the leaves present in `grads` (others are left as they are).

        Args:
            grads: TensorDict of gradients, a subset of ``params``'s leaves.
            opt_state: the state from `init` (or a previous update).
            params: the parameter TensorDict.
            foreach: see `Context.foreach` (False under `torch.vmap`).

        Returns:
            ``(new_params, new_opt_state)``; inputs are not modified.
        """
        keys = [k for k, _ in grads.items(True, True)]
        plist = [params.get(k) for k in keys]
        glist = [grads.get(k) for k in keys]
        states = {m: [opt_state.get((m,) + k) for k in keys] for m in self.mirrors}
        new_p, new_s = self.update_lists(keys, plist, glist, states, foreach=foreach)
        params = params.clone(False)
        opt_state = opt_state.clone(False)
        for i, k in enumerate(keys):
            params.set(k, new_p[i])
            for m in self.mirrors:
                opt_state.set((m,) + k, new_s[m][i])
        return params, opt_state

    def update_lists(
        self,
        keys: Sequence[Key],
        params: list[Tensor],
        grads: list[Tensor],
        states: Mapping[str, list[Tensor]],
        *,
        donate: bool | Sequence[bool] = False,
        foreach: bool = True,
    ) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        """The update on flat lists (the hot path of `esper_fn.train_step` and Tezzeret's kernels).

        Args:
            keys: the leaf keys, each starting with "host" or "seeds" (selects the learning rate).
            params, grads: tensors aligned with `keys`.
            states: mirror name -> list aligned with `keys`.
            donate: the caller gives up these tensors (parameters and state; no one else can see
                them), so they are updated in place (JAX's buffer donation); one flag for all leaves
                or one per leaf. By default fresh tensors are written.
            foreach: see `Context.foreach` (False under `torch.vmap`).

        Returns:
            new parameter list and new mirror lists (fresh tensors, or the donated ones).
        """
        n = len(keys)
        if not n:
            return [], {m: [] for m in self.mirrors}
        if isinstance(donate, bool):
            return self._step(keys, params, grads, states, donate, foreach)
        give = [bool(d) for d in donate]
        if all(give) or not any(give):
            return self._step(keys, params, grads, states, give[0], foreach)
        new_p: list[Tensor] = [None] * n  # type: ignore[list-item]
        new_s: dict[str, list[Tensor]] = {m: [None] * n for m in self.mirrors}  # type: ignore[misc]
        for flag in (True, False):  # donated leaves in place, the others on fresh tensors
            idx = [i for i in range(n) if give[i] == flag]
            p2, s2 = self._step([keys[i] for i in idx], [params[i] for i in idx], [grads[i] for i in idx],
                                {m: [states[m][i] for i in idx] for m in self.mirrors}, flag, foreach)
            for j, i in enumerate(idx):
                new_p[i] = p2[j]
                for m in self.mirrors:
                    new_s[m][i] = s2[m][j]
        return new_p, new_s

    def _step(self, keys, params, grads, states, inplace: bool, foreach: bool):
        dt = params[0].dtype
        for p in params:
            if p.dtype != dt:
                dt = torch.float64
                break
        steps = states["step"]
        s0 = steps[0]
        ctx = Context((), s0, dt, inplace, foreach)
        steps = _each("add", steps, _const(1.0, s0.dtype, s0.device), ctx=ctx, inplace=inplace)
        ctx = Context(tuple([k[0] for k in keys]), torch.stack(steps), dt, inplace, foreach)
        t = self.transform
        updates, inner = t.update(grads, {m: states[m] for m in t.mirrors}, params, ctx)
        new_p = apply_updates(params, updates, ctx)
        inner["step"] = steps
        if inplace:  # the tensors are the caller's; the lists need not be
            return list(new_p), {m: list(v) for m, v in inner.items()}
        return new_p, inner


def adam(lr: float | Mapping[str, float] = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: float = 0.0) -> Optimizer:
    """Adam (L2 weight decay in the gradient, as `torch.optim.Adam`):
    ``chain(add_decayed_weights(wd), scale_by_adam(*betas, eps), scale_by_learning_rate(lr))``."""
    return Optimizer("adam", _lr_map(lr), ("step", "mu", "nu"),
                     {"beta1": betas[0], "beta2": betas[1], "eps": eps, "weight_decay": weight_decay})


def adamw(lr: float | Mapping[str, float] = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 1e-2) -> Optimizer:
    """AdamW (decoupled weight decay, as `torch.optim.AdamW`):
    ``chain(scale_by_adam(*betas, eps), add_decayed_weights(wd), scale_by_learning_rate(lr))``."""
    return Optimizer("adamw", _lr_map(lr), ("step", "mu", "nu"),
                     {"beta1": betas[0], "beta2": betas[1], "eps": eps, "weight_decay": weight_decay})


def sgd(lr: float | Mapping[str, float] = 1e-2, momentum: float = 0.0, weight_decay: float = 0.0,
        nesterov: bool = False) -> Optimizer:
    """SGD with optional momentum (dampening 0), Nesterov and L2 weight decay, as `torch.optim.SGD`:
    ``chain(add_decayed_weights(wd), trace(momentum, nesterov), scale_by_learning_rate(lr))``."""
    if nesterov and momentum <= 0:
        raise ConfigError("sgd: nesterov=True needs momentum > 0.")
    mirrors = ("step", "momentum") if momentum else ("step",)
    return Optimizer("sgd", _lr_map(lr), mirrors,
                     {"momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov})
