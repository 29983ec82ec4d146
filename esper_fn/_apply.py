"""The forward pass and the functional train step over a `State`.

Forward semantics by stage (alpha is the slot's tensor-valued blend weight):
- DORMANT, GERMINATED, PRUNED, EMBARGOED: the slot is absent from the computation.
- TRAINING (incubation): absent from the live forward, so the live output equals the host's exactly.
  With ``incubation="shadow"`` each train step also runs a *shadow* forward with the seed fused at
  alpha 1 (``h + s``) over detached host weights; only the incubating seeds get its gradient. With
  ``incubation="none"`` the seed does not learn until it blends (use a zero-initialised seed and a
  short ramp: advance straight to BLENDING).
- BLENDING, HOLDING, FOSSILIZED (non-mergeable): ``h + alpha * delta``. A fossilized seed is a
  permanent part of the network and trains with it, like the host.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _blueprint as bpm
from ._errors import ConfigError, GraftError
from ._host import SlotSpec, identity_slot
from ._lifecycle import Stage
from ._state import Key, State, derive, check_not_donated

__all__ = ["apply", "check_batch", "train_step", "trained_keys", "INCUBATION"]

INCUBATION = ("shadow", "none")

# Per-host role of a seed slot, derived from its stage and alpha (data, so stacked hosts may differ).
NONE, IDLE, INCUBATING, LIVE = 0, 1, 2, 3
"""NONE: no seed in the computation (DORMANT, PRUNED, EMBARGOED, or a merged fossil). IDLE: a
GERMINATED seed (exists, does not compute). INCUBATING: TRAINING, or BLENDING while alpha is still 0
(the live output ignores the seed, so it can only learn in the shadow forward). LIVE: BLENDING with
alpha > 0, HOLDING, FOSSILIZED: ``h + alpha * delta`` in the live forward."""


def roles(state: State) -> Tensor:
    """The role code of every slot on every host: int64 ``[*batch, S]`` (see `LIVE` etc.)."""
    stage, alpha = state.slots["stage"], state.slots["alpha"]
    blending = stage == int(Stage.BLENDING)
    # torch.where rather than boolean-mask assignment: no data-dependent shapes, so nothing waits for
    # a device or breaks a compiled graph.
    live = (blending & (alpha > 0)) | (stage == int(Stage.HOLDING)) | (stage == int(Stage.FOSSILIZED))
    incubating = (stage == int(Stage.TRAINING)) | (blending & (alpha <= 0))
    out = torch.where(stage == int(Stage.GERMINATED), IDLE, NONE)
    out = torch.where(incubating, INCUBATING, out)
    return torch.where(live, LIVE, out)


def slot_view(state: State) -> tuple[Tensor, Tensor, Tensor]:
    """What the forward needs of the slot records, on the state's device: the alphas (float32
    ``[*batch, S]``), the roles (int64 ``[*batch, S]``, `roles`) and the stages (int64).

    The records stay on the CPU (lifecycle decisions read them without waiting for the device); this
    copy is made once per record and cached with the state's structure, so the steps between two
    lifecycle changes (an epoch of `train_step`s) copy nothing. On the CPU it is the records
    themselves.
    """
    cache = getattr(state, "_cache", None)
    if cache is None:  # a compiled kernel's view (esper_fn.tezzeret): its records are already on the device
        return state.slots["alpha"], roles(state), state.slots["stage"]
    cached = cache.get("slot_view")
    if cached is not None and cached[0] is state.slots:
        return cached[1]
    device = state.device
    view = (state.slots["alpha"].to(device), roles(state).to(device), state.slots["stage"].to(device))
    state._cache["slot_view"] = (state.slots, view)
    return view


@dataclass(frozen=True)
class Plan:
    """Structure of a state, derived once per structure and reused by every step.

    Slots enter a pass if any host needs them there; hosts that do not (a seed still incubating on
    one host, live on another) run it at alpha 0 and are masked out of its gradient and update.
    """

    live: dict[str, tuple[bpm.Blueprint, SlotSpec, int]]  # seeds in the live forward
    incubating: dict[str, tuple[bpm.Blueprint, SlotSpec, int]]  # seeds with an INCUBATING host
    host_keys: tuple[Key, ...]
    host_names: tuple[str, ...]  # dotted names aligned with host_keys
    seed_keys: dict[str, tuple[Key, ...]]
    slot_roles: tuple[frozenset[int], ...]  # roles present per slot, over the hosts
    has_buffers: bool

    def trainable(self, shadow: bool) -> tuple[Key, ...]:
        """Keys that get gradients in a train step (host first, then seeds by slot)."""
        keys = list(self.host_keys)
        for n, (_, _, i) in {**self.live, **self.incubating}.items():
            if LIVE in self.slot_roles[i] or (shadow and INCUBATING in self.slot_roles[i]):
                keys.extend(self.seed_keys.get(n, ()))
        return tuple(keys)


def make_plan(state: State) -> Plan:
    if state._own.donated:
        check_not_donated(state, "using a state")
    cached = state._cache.get("plan")
    if cached is not None and cached[0] is state.slots and cached[1] == state.blueprints:
        return cached[2]
    S = len(state.slot_names)
    r = roles(state).reshape(-1, S).T.tolist() if S else []
    slot_roles = tuple(frozenset(x) for x in r)
    sig = (state.blueprints, slot_roles, tuple(state.buffers_flat),
           tuple((k, v.shape[len(state.batch):]) for k, v in state.params_flat.items()))
    plans = state.host._plan_cache
    plan = plans.get(sig)
    if plan is None:
        live, incubating = {}, {}
        for i, (name, present, bid) in enumerate(zip(state.slot_names, slot_roles, state.blueprints)):
            if bid is None:
                continue
            entry = (bpm.registry()[bid], state.spec(name), i)  # the exact design the state holds
            if LIVE in present:
                live[name] = entry
            if INCUBATING in present:
                incubating[name] = entry
        host_keys = tuple(k for k in state.params_flat if k[0] == "host")
        seed_keys: dict[str, list[Key]] = {}
        for k in state.params_flat:
            if k[0] == "seeds":
                seed_keys.setdefault(k[1], []).append(k)
        plan = Plan(live, incubating, host_keys, tuple(".".join(k[1:]) for k in host_keys),
                     {n: tuple(v) for n, v in seed_keys.items()}, slot_roles, bool(state.buffers_flat))
        if len(plans) > 4096:  # structures seen by a long-lived host (e.g. an RL environment)
            plans.clear()
        plans[sig] = plan
    state._cache["plan"] = (state.slots, state.blueprints, plan)
    return plan


def make_slot_fn(entries, seeds, alphas, train, aux, seed_buffers, on=None):
    """The slot function for one forward: dormant slots are a dict miss, live ones add alpha * delta.

    `on` maps a slot to a per-host 0-d bool (stacked states whose hosts disagree about the slot):
    where it is False the slot acts exactly as absent for that host (output, auxiliary loss and
    buffer updates discarded; nothing of the seed, not even a NaN, reaches the host's loss).
    """
    if not entries:
        return identity_slot
    pending: dict[str, Tensor] = {}
    on = on or {}

    def slot(name: str, h: Tensor, x_in: Tensor | None = None) -> Tensor:
        if pending:
            carry = pending.pop(name, None)
            if carry is not None:
                h = h + carry
        e = entries.get(name)
        if e is None:
            return h
        bp, spec, _ = e
        m = on.get(name)
        h_seed, x_seed = h, x_in
        if m is not None:  # an off host's seed sees detached inputs: no gradient flows back through it
            h_seed = torch.where(m, h, h.detach())
            x_seed = None if x_in is None else torch.where(m, x_in, x_in.detach())
        out = bp.apply(seeds[name], h_seed, x_seed, spec, train)
        if isinstance(out, bpm.SeedOut):
            if out.aux_loss is not None:
                aux.append(out.aux_loss if m is None else torch.where(m, out.aux_loss, torch.zeros_like(out.aux_loss)))
            if out.buffers is not None:
                seed_buffers[name] = (out.buffers if m is None else
                                      {k: torch.where(m, v, seeds[name][k]) for k, v in out.buffers.items()})
            out = out.delta
        d = alphas[name] * out
        if m is not None:
            d = torch.where(m, d, torch.zeros_like(d))
        if bp.meta.target == "consumer":
            pending[spec.consumer] = d
            return h
        return h + d

    return slot


def _forward(state: State, plan: Plan, entries, host_flat, seeds, alphas, x, train, on=None):
    """Run one (unbatched) forward. Returns (y, aux_loss_sum | None, host_buffers, seed_buffers)."""
    aux: list[Tensor] = []
    seed_buffers: dict[str, dict[str, Tensor]] = {}
    slot_fn = make_slot_fn(entries, seeds, alphas, train, aux, seed_buffers, on)
    y, host_buffers = state.host.forward_fn(host_flat, x, slot_fn, train)
    return y, (sum(aux) if aux else None), host_buffers, seed_buffers


def on_masks(state: State, plan: Plan, entries, shadow: bool = False) -> dict[str, Tensor]:
    """Per-host on/off flags ([N] bool) for the slots of `entries` that some stacked hosts must not
    run: in the live forward a slot is on where its role is LIVE; in the shadow forward where it is
    LIVE or INCUBATING. Empty for single states and for slots every host runs."""
    if not state.batch:
        return {}
    wanted = {LIVE, INCUBATING} if shadow else {LIVE}
    r = None
    out = {}
    for n, (_, _, i) in entries.items():
        if plan.slot_roles[i] <= wanted:
            continue
        if r is None:
            r = slot_view(state)[1]
        m = r[..., i] == LIVE
        if shadow:
            m = m | (r[..., i] == INCUBATING)
        out[n] = m
    return out


def slot_inputs(state: State, plan: Plan, params: Mapping[Key, Tensor], entries, alpha: Tensor | None = None):
    host_flat = {n: params[k] for n, k in zip(plan.host_names, plan.host_keys)}
    if plan.has_buffers:
        for k, v in state.buffers_flat.items():
            if k[0] == "host":
                host_flat[".".join(k[1:])] = v
    seeds = {}
    for name in entries:
        d = {k[2]: params[k] for k in plan.seed_keys.get(name, ())}
        for k, v in state.buffers_flat.items():
            if k[0] == "seeds" and k[1] == name:
                d[k[2]] = v
        seeds[name] = d
    alpha = slot_view(state)[0] if alpha is None else alpha
    alphas = {name: alpha[..., i] for name, (_, _, i) in entries.items()}
    return host_flat, seeds, alphas


def forward_pass(state, plan, entries, params, x, train, alpha: Tensor | None = None, shadow: bool = False):
    """Forward of a single or stacked state (`alpha`: [*batch, S] overriding the slots' alphas;
    `shadow`: incubating seeds count as on, as in the shadow forward)."""
    host_flat, seeds, alphas = slot_inputs(state, plan, params, entries, alpha)
    if not state.batch:
        return _forward(state, plan, entries, host_flat, seeds, alphas, x, train)
    if len(state.batch) != 1:
        raise GraftError(f"apply supports one stacking dimension, got batch {state.batch}; stack one level only.")
    n = state.batch[0]
    if x.dim() < 2 or x.shape[0] != n:
        raise GraftError(f"a state stacked over {n} hosts needs one batch per host, x of shape [{n}, B, ...]; got "
                         f"{tuple(x.shape)}. Expand a shared batch with `x.expand({n}, *x.shape)`.")
    on = on_masks(state, plan, entries, shadow)

    def one(h, s, a, o, xi):
        y, aux, hb, sb = _forward(state, plan, entries, h, s, a, xi, train, o)
        return y, (aux if aux is not None else y.new_zeros((), dtype=torch.float32)), hb, sb  # on y's device

    y, aux, hb, sb = torch.vmap(one, randomness="different")(host_flat, seeds, alphas, on, x)
    return y, aux, hb, sb


def check_batch(state: State, x: Tensor, *, shared: bool = False) -> None:
    """`Host.check_input` for a batch given to `state`: one comparison of shape and dtype.

    Args:
        state: a single or stacked state; floating-point input must have its parameters' dtype.
        x: ``[B, ...]``, or ``[N, B, ...]`` for a state stacked over N hosts (unless `shared`).
        shared: `x` is one batch that serves every stacked host (``[B, ...]``).

    Raises:
        HostError: the per-sample shape or the dtype is not the host's input. (A stacked state
            given a batch without its host dimension is left to the forward's `GraftError`.)
    """
    nb = 0 if shared else len(state.batch)
    if nb and (not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] != state.batch[0]):
        return
    dtype = next((v.dtype for k, v in state.params_flat.items() if k[0] == "host"), None)  # host keys come first
    state.host.check_input(x, 1 + nb, float_dtype=dtype)


def apply(state: State, x: Tensor, *, train: bool = False) -> Tensor:
    """The network's output for input `x` (eval mode unless `train`; buffers are not updated).

    Args:
        state: a single or stacked state.
        x: input batch, e.g. [B, 40] for MNIST-1D hosts; [N, B, ...] for a state stacked over N.

    Returns:
        The host's output, e.g. logits [B, n_classes] ([N, B, n_classes] stacked).

    Raises:
        HostError: `x`'s per-sample shape or dtype is not the host's input (`check_batch`).
        DonatedStateError: `state` was donated to a `train_step`.
    """
    check_batch(state, x)
    plan = make_plan(state)
    return forward_pass(state, plan, plan.live, state.params_flat, x, train)[0]


def train_step(
    state: State,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    incubation: str = "shadow",
    aux_weight: float = 1e-2,
    grad_stats: bool = False,
    with_output: bool = False,
    donate: bool = False,
) -> tuple[State, dict[str, Tensor]]:
    """One optimisation step: forward, backward, optimizer update. Pure: returns a new state.

    The host trains in every step. Seeds in BLENDING, HOLDING or FOSSILIZED train in the live forward; seeds in
    TRAINING train only in the shadow forward (``incubation="shadow"``); FOSSILIZED seeds train with the
    host (they are part of the network now).

    Args:
        state: single or stacked state.
        x: input batch ([B, ...]; [N, B, ...] when stacked).
        y: targets ([B]; [N, B] when stacked).
        loss_fn: ``loss_fn(output, target) -> 0-d mean loss``.
        incubation: "shadow" or "none" (see module docstring).
        aux_weight: weight of seeds' auxiliary losses (router load balancing).
        (Seed buffers, such as an activation tap's statistics, are updated by the live forward only;
        the shadow forward's are discarded.)
        grad_stats: also return "grad_sq", the squared gradient norm of every trained leaf
            (float32 [K], or [N, K] stacked), aligned with `trained_keys(state)`.
        with_output: also return "output", the live forward's detached output (before the update).
        donate: give up `state`'s tensors, so the optimizer may update them in place (as JAX's
            ``donate_argnums``; saves three tensor copies per leaf). Only tensors no other state can
            see are given up: those a previous `train_step` wrote for `state` alone, as long as no
            state was derived from `state` since (germinate, advance, tick, `State.replace`,
            `dataclasses.replace`, ... all revoke it). Everything else is copied, so donation never
            changes another state; after a donating call, `state` itself must not be used again.
            `train_epoch` donates the intermediate states it creates itself, never the caller's.
            Using `state` again after a call that gave up any of its tensors raises
            `DonatedStateError`.

    Returns:
        ``(new_state, metrics)``; metrics holds detached tensors "loss" (live loss per host, 0-d or
        [N]) and, while seeds incubate, "shadow_loss".

    Raises:
        HostError: `x`'s per-sample shape or dtype is not the host's input (`check_batch`).
        DonatedStateError: `state` was donated to an earlier `train_step`.
    """
    if incubation not in INCUBATION:
        raise ConfigError(f"incubation must be one of {INCUBATION}, got {incubation!r}.")
    check_batch(state, x)
    plan = make_plan(state)
    shadow = incubation == "shadow" and bool(plan.incubating)
    keys = plan.trainable(shadow)
    masks = update_masks(state, plan, shadow)
    pf = state.params_flat
    leaves = [pf[k].detach().requires_grad_() for k in keys]
    params = dict(pf)
    params.update(zip(keys, leaves))
    batched = bool(state.batch)
    lf = per_host_loss(loss_fn, batched)

    with torch.enable_grad():
        total, parts, host_buf, seed_buf = step_loss(state, plan, params, x, y, lf, aux_weight, shadow)
        metrics = {"loss": parts["loss"].detach()}
        if with_output:
            metrics["output"] = parts["output"].detach()
        if shadow:
            metrics["shadow_loss"] = parts["shadow_loss"].detach()
        grads = torch.autograd.grad(total, leaves, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)]
    if grad_stats:
        nb = len(state.batch)
        if nb:
            metrics["grad_sq"] = torch.stack([g.square().flatten(nb).sum(-1) for g in grads], -1)
        else:
            metrics["grad_sq"] = torch.stack(torch._foreach_norm(grads)).square()
    opt = state.opt_flat
    mirrors = state.optimizer.mirrors
    states = {m: [opt[(m,) + k] for k in keys] for m in mirrors}
    own = state._own
    owned = own.keys if donate and own.holder == id(state) else frozenset()
    give = [k in owned and k not in masks for k in keys]
    new_p, new_s = state.optimizer.update_lists(keys, [pf[k] for k in keys], grads, states, donate=give)
    if masks:  # hosts whose seed does not train this step keep its parameters and moments
        for j, k in enumerate(keys):
            m = masks.get(k)
            if m is None:
                continue
            new_p[j] = torch.where(m.view(m.shape + (1,) * (new_p[j].dim() - m.dim())), new_p[j], pf[k])
            for name in mirrors:
                old = states[name][j]
                new_s[name][j] = torch.where(m.view(m.shape + (1,) * (old.dim() - m.dim())), new_s[name][j], old)
    new_state = stepped(state, keys, new_p, new_s, host_buf, seed_buf)
    if any(give):
        own.donated = True  # its tensors now hold the new state's values
    return new_state, metrics


def per_host_loss(loss_fn: Callable[[Tensor, Tensor], Tensor], batched: bool) -> Callable[[Tensor, Tensor], Tensor]:
    """`loss_fn` as a per-host loss: 0-d for one host, [N] for N stacked hosts."""
    if not batched:
        return loss_fn
    if loss_fn is F.cross_entropy:  # one flat call is faster than vmapping it (same values)
        return lambda o, t: F.cross_entropy(o.flatten(0, 1), t.flatten(), reduction="none").view(t.shape).mean(-1)
    return torch.vmap(loss_fn)


def step_loss(state, plan: Plan, params, x: Tensor, y: Tensor, lf, aux_weight: float, shadow: bool):
    """The training objective of one step: the live loss summed over hosts, the seeds' auxiliary
    losses, and (with `shadow`) the shadow forward's loss. Returns ``(total, parts, host_buffers,
    seed_buffers)``, parts holding "loss" (per host), "output" and, with `shadow`, "shadow_loss"."""
    batched = bool(state.batch)
    out, aux, host_buf, seed_buf = forward_pass(state, plan, plan.live, params, x, True)
    per_host = lf(out, y)
    total = per_host.sum() if batched else per_host
    if aux is not None:
        total = total + aux_weight * (aux.sum() if batched else aux)
    parts = {"loss": per_host, "output": out}
    if shadow:
        sout, saux = _shadow_forward(state, plan, params, x)
        s_loss = lf(sout, y)
        total = total + (s_loss.sum() if batched else s_loss)
        if saux is not None:
            total = total + aux_weight * (saux.sum() if batched else saux)
        parts["shadow_loss"] = s_loss
    return total, parts, host_buf, seed_buf


def stepped(state: State, keys, new_p, new_s, host_buf, seed_buf) -> State:
    """The state after a step: updated leaves `keys` (`new_p`, mirrors `new_s`) and the buffers the
    training forward returned; it owns the fresh tensors of `keys` (they may be donated next)."""
    params = dict(state.params_flat)
    params.update(zip(keys, new_p))
    opt = dict(state.opt_flat)
    for m in state.optimizer.mirrors:
        opt.update(zip(((m,) + k for k in keys), new_s[m]))
    buffers = state.buffers_flat
    if host_buf or seed_buf:
        buffers = dict(buffers)
        for n, v in host_buf.items():
            buffers[("host", *n.split("."))] = v.detach()
        for slot, d in seed_buf.items():
            for n, v in d.items():
                buffers[("seeds", slot, n)] = v.detach()
    return derive(state, params_flat=params, opt_flat=opt, buffers_flat=buffers, _owned=frozenset(keys),
                   _keep_cache=True)


def update_masks(state: State, plan: Plan, shadow: bool) -> dict[Key, Tensor]:
    """Per-host update masks ([N] bool) for seed keys that train on some stacked hosts only."""
    if not state.batch:
        return {}
    cached = state._cache.get(("masks", shadow))
    if cached is not None and cached[0] is state.slots:
        return cached[1]
    r = slot_view(state)[1]
    out: dict[Key, Tensor] = {}
    for n, (_, _, i) in {**plan.live, **plan.incubating}.items():
        present = plan.slot_roles[i]
        trains = {LIVE, INCUBATING} if shadow else {LIVE}
        if not (present & trains) or present <= trains:
            continue  # trained on no host (not a trainable key) or on every host (no mask)
        m = r[..., i] == LIVE
        if shadow:
            m = m | (r[..., i] == INCUBATING)
        for k in plan.seed_keys.get(n, ()):
            out[k] = m
    state._cache[("masks", shadow)] = (state.slots, out)
    return out


def _shadow_forward(state: State, plan: Plan, params: dict[Key, Tensor], x: Tensor):
    """The shadow forward: every incubating seed fused at alpha 1 over detached host weights, so
    only incubating seeds learn from it (per host, on stacked states). Returns (output, aux)."""
    alpha, r, _ = slot_view(state)
    alpha = torch.where(r == INCUBATING, torch.ones_like(alpha), alpha)
    sp = {}
    for k, v in params.items():
        if k[0] == "host" or k[1] not in plan.incubating:
            sp[k] = v.detach()
            continue
        i = plan.incubating[k[1]][2]
        if plan.slot_roles[i] == frozenset({INCUBATING}):
            sp[k] = v
        else:  # the seed incubates on some hosts only: the others' copies get no gradient here
            m = (r[..., i] == INCUBATING).to(v.dtype)
            m = m.view(m.shape + (1,) * (v.dim() - m.dim()))
            sp[k] = m * v + (1 - m) * v.detach()
    entries = dict(plan.live)
    entries.update(plan.incubating)
    sout, saux, _, _ = forward_pass(state, plan, entries, sp, x, True, alpha, shadow=True)
    return sout, saux


def trained_keys(state: State, incubation: str = "shadow") -> tuple[Key, ...]:
    """The parameter keys a `train_step` on `state` updates, in the order of its "grad_sq" metric."""
    plan = make_plan(state)
    return plan.trainable(incubation == "shadow" and bool(plan.incubating))
