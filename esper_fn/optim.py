"""Functional optimizers as (init, update) pairs whose state mirrors the parameter tree.

The optimizer state is a `TensorDict` of *mirrors*: each top-level entry ("step", "mu", "nu",
"momentum") has exactly the keys of the parameter tree. "step" holds a 0-d count per leaf, so a seed
grafted later starts its own bias correction at zero; every other mirror holds a tensor shaped like
its parameter. Lifecycle ops (germinate, fossilize, prune) edit every mirror together with the
parameters; `zero_leaf` is the rule they use for new leaves.

`update` works on flat lists with out-of-place `torch._foreach_*` kernels: it allocates new tensors and
never writes into its inputs, and it costs about what `torch.optim.Adam(foreach=True)` costs.

Learning rates may differ between the host and the seeds: pass ``lr={"host": 1e-2, "seeds": 3e-3}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from tensordict import TensorDict
from torch import Tensor

from ._errors import ConfigError

__all__ = ["Optimizer", "adam", "adamw", "sgd", "zero_leaf"]

Key = tuple[str, ...]
GROUPS = ("host", "seeds")


def zero_leaf(mirror: str, p: Tensor) -> Tensor:
    """The initial optimizer-state leaf of mirror `mirror` for parameter `p`."""
    return torch.zeros((), dtype=torch.float32) if mirror == "step" else torch.zeros_like(p)


def _lr_map(lr: float | Mapping[str, float]) -> dict[str, float]:
    if isinstance(lr, Mapping):
        unknown = set(lr) - set(GROUPS)
        if unknown or not lr:
            raise ConfigError(f"lr mapping keys must be among {GROUPS}, got {sorted(lr)}.")
        base = lr.get("host", lr.get("seeds"))
        out = {g: float(lr.get(g, base)) for g in GROUPS}
    else:
        out = {g: float(lr) for g in GROUPS}
    if any(v < 0 for v in out.values()):
        raise ConfigError(f"learning rates must be >= 0, got {out}.")
    return out


@dataclass(frozen=True)
class Optimizer:
    """A functional optimizer.

    Attributes:
        name: "adam", "adamw" or "sgd".
        lr: learning rate per group ("host", "seeds").
        mirrors: names of the state mirrors, e.g. ("step", "mu", "nu").
        hyper: the remaining hyperparameters.
    """

    name: str
    lr: Mapping[str, float]
    mirrors: tuple[str, ...]
    hyper: Mapping[str, float | bool]

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

    def update(self, grads: TensorDict, opt_state: TensorDict, params: TensorDict) -> tuple[TensorDict, TensorDict]:
        """One step over the leaves present in `grads` (others are left as they are).

        Args:
            grads: TensorDict of gradients, a subset of ``params``'s leaves.
            opt_state: the state from `init` (or a previous update).
            params: the parameter TensorDict.

        Returns:
            ``(new_params, new_opt_state)``; inputs are not modified.
        """
        keys = [k for k, _ in grads.items(True, True)]
        plist = [params.get(k) for k in keys]
        glist = [grads.get(k) for k in keys]
        states = {m: [opt_state.get((m,) + k) for k in keys] for m in self.mirrors}
        new_p, new_s = self.update_lists(keys, plist, glist, states)
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
    ) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        """The update on flat lists (the hot path used by `esper_fn.train_step`).

        Args:
            keys: the leaf keys, each starting with "host" or "seeds" (selects the learning rate).
            params, grads: tensors aligned with `keys`.
            states: mirror name -> list aligned with `keys`.
            donate: the caller gives up these tensors (no one else can see them), so Adam may update
                them in place (JAX's buffer donation); one flag for all leaves or one per leaf. By
                default it writes fresh tensors.

        Returns:
            new parameter list and new mirror lists (fresh tensors, or the donated ones).
        """
        new_p: list[Tensor] = [None] * len(keys)  # type: ignore[list-item]
        new_s: dict[str, list[Tensor]] = {m: [None] * len(keys) for m in self.mirrors}  # type: ignore[misc]
        give = [bool(donate)] * len(keys) if isinstance(donate, bool) else [bool(d) for d in donate]
        for group in GROUPS:
            idx = [i for i, k in enumerate(keys) if k[0] == group]
            if not idx:
                continue
            lr = self.lr[group]
            p = [params[i] for i in idx]
            g = [grads[i] for i in idx]
            s = {m: [states[m][i] for i in idx] for m in self.mirrors}
            if self.name == "sgd":
                p2, s2 = self._sgd(p, g, s, lr)
            else:
                p2, s2 = self._adam(p, g, s, lr, [give[i] for i in idx])
            for j, i in enumerate(idx):
                new_p[i] = p2[j]
                for m in self.mirrors:
                    new_s[m][i] = s2[m][j]
        return new_p, new_s

    def _adam(self, p, g, s, lr, donate):
        h = self.hyper
        b1, b2, eps, wd = h["beta1"], h["beta2"], h["eps"], h["weight_decay"]
        if p[0].device.type == "cpu":
            # One fused kernel (torch.optim.Adam(fused=True)'s): donated leaves are updated in place,
            # the others on fresh copies.
            # The kernel walks flat memory: every operand must be dense (a transposed weight from
            # a wrapped module is not), so a non-contiguous leaf is updated on a dense copy.
            dense = [d and t.is_contiguous() and m.is_contiguous() and v.is_contiguous()
                     for d, t, m, v in zip(donate, p, s["mu"], s["nu"])]
            copy = lambda t: t.clone(memory_format=torch.contiguous_format)  # noqa: E731
            new_p = [t if d else copy(t) for t, d in zip(p, dense)]
            mu = [t if d else copy(t) for t, d in zip(s["mu"], dense)]
            nu = [t if d else copy(t) for t, d in zip(s["nu"], dense)]
            step = [t if d else t.clone() for t, d in zip(s["step"], dense)]
            torch._foreach_add_(step, 1.0)
            args = (new_p, [t.contiguous() for t in g], mu, nu, step)  # the kernel assumes dense memory
            if step[0].dim():
                # Stacked hosts keep a step count per host ([N]). In lockstep (the usual case) one
                # count serves all; otherwise hand the kernel one view per host, so each gets its own
                # bias correction, and the updates land in the stacked tensors.
                counts = torch.stack(step)
                if bool((counts == counts[..., :1]).all()):
                    args = args[:4] + ([t[(0,) * t.dim()] for t in step],)
                else:
                    args = tuple([v for t in lst for v in t.unbind(0)] for lst in args)
            fused = torch._fused_adamw_ if self.name == "adamw" else torch._fused_adam_
            fused(args[0], args[1], args[2], args[3], [], args[4], amsgrad=False, lr=lr, beta1=b1, beta2=b2,
                  weight_decay=wd, eps=eps, maximize=False, grad_scale=None, found_inf=None)
            return new_p, {"step": step, "mu": mu, "nu": nu}
        if wd and self.name == "adam":  # L2 penalty in the gradient (torch.optim.Adam semantics)
            g = torch._foreach_add(g, p, alpha=wd)
        step = torch._foreach_add(s["step"], 1.0)
        mu = torch._foreach_lerp(s["mu"], g, 1 - b1)
        nu = torch._foreach_mul(s["nu"], b2)
        torch._foreach_addcmul_(nu, g, g, 1 - b2)
        bc1 = torch._foreach_pow(b1, step)
        torch._foreach_neg_(bc1)
        torch._foreach_add_(bc1, 1.0)
        bc2 = torch._foreach_pow(b2, step)
        torch._foreach_neg_(bc2)
        torch._foreach_add_(bc2, 1.0)
        torch._foreach_sqrt_(bc2)
        if step[0].dim():  # stacked hosts: per-host counts [N] broadcast over each leaf's dims
            bc1 = [b.reshape(b.shape + (1,) * (q.dim() - b.dim())) for b, q in zip(bc1, p)]
            bc2 = [b.reshape(b.shape + (1,) * (q.dim() - b.dim())) for b, q in zip(bc2, p)]
        denom = torch._foreach_sqrt(nu)
        torch._foreach_div_(denom, bc2)
        torch._foreach_add_(denom, eps)
        upd = torch._foreach_div(mu, denom)
        torch._foreach_div_(upd, bc1)
        if wd and self.name == "adamw":  # decoupled decay (torch.optim.AdamW semantics)
            p = torch._foreach_mul(p, 1 - lr * wd)
            torch._foreach_add_(p, upd, alpha=-lr)
            new_p = p
        else:
            new_p = torch._foreach_add(p, upd, alpha=-lr)
        return new_p, {"step": step, "mu": mu, "nu": nu}

    def _sgd(self, p, g, s, lr):
        h = self.hyper
        mom, wd, nesterov = h["momentum"], h["weight_decay"], h["nesterov"]
        if wd:
            g = torch._foreach_add(g, p, alpha=wd)
        step = torch._foreach_add(s["step"], 1.0)
        out = {"step": step}
        if mom:
            # torch.optim.SGD: the first step copies the gradient into the buffer (dampening 0).
            # The buffer starts at zero, so mom * 0 + g is that copy, per host when stacked.
            buf = torch._foreach_add(torch._foreach_mul(s["momentum"], mom), g)
            out["momentum"] = buf
            d = torch._foreach_add(g, buf, alpha=mom) if nesterov else buf
        else:
            d = g
        return torch._foreach_add(p, d, alpha=-lr), out


def adam(lr: float | Mapping[str, float] = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: float = 0.0) -> Optimizer:
    """Adam (L2 weight decay in the gradient, as `torch.optim.Adam`)."""
    return Optimizer("adam", _lr_map(lr), ("step", "mu", "nu"),
                     {"beta1": betas[0], "beta2": betas[1], "eps": eps, "weight_decay": weight_decay})


def adamw(lr: float | Mapping[str, float] = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 1e-2) -> Optimizer:
    """AdamW (decoupled weight decay, as `torch.optim.AdamW`)."""
    return Optimizer("adamw", _lr_map(lr), ("step", "mu", "nu"),
                     {"beta1": betas[0], "beta2": betas[1], "eps": eps, "weight_decay": weight_decay})


def sgd(lr: float | Mapping[str, float] = 1e-2, momentum: float = 0.0, weight_decay: float = 0.0,
        nesterov: bool = False) -> Optimizer:
    """SGD with optional momentum (dampening 0), Nesterov and L2 weight decay, as `torch.optim.SGD`."""
    if nesterov and momentum <= 0:
        raise ConfigError("sgd: nesterov=True needs momentum > 0.")
    mirrors = ("step", "momentum") if momentum else ("step",)
    return Optimizer("sgd", _lr_map(lr), mirrors,
                     {"momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov})
