"""esper_fn.optim: the transforms compose into adam/adamw/sgd, which equal torch.optim's rules; one
update runs per leaf or per host, foreach or leaf by leaf (and under vmap), fresh or on donated
tensors, with the same values."""

from __future__ import annotations

import copy
import math
import pickle
from pathlib import Path

import pytest
import torch

import esper_fn as ef
from esper_fn import optim as eo

SHAPES = [(16, 40), (16,), (10, 16), (10,)]
KEYS = [("host", "fc1", "weight"), ("host", "fc1", "bias"), ("seeds", "fc1", "w"), ("seeds", "fc1", "b")]


def _leaves(g: torch.Generator, n: int | None = None, dtype=torch.float32) -> list[torch.Tensor]:
    pre = () if n is None else (n,)
    return [torch.randn(*pre, *s, generator=g, dtype=dtype) for s in SHAPES]


def _state(opt: eo.Optimizer, params: list[torch.Tensor], n: int | None = None) -> dict[str, list[torch.Tensor]]:
    return {m: [torch.zeros(() if n is None else (n,)) if m == "step" else torch.zeros_like(p) for p in params]
            for m in opt.mirrors}


def _run(opt, params, grads_seq, state=None, **kw):
    """`len(grads_seq)` updates; returns the final params and state."""
    state = state or _state(opt, params)
    for grads in grads_seq:
        params, state = opt.update_lists(KEYS, params, grads, state, **kw)
    return params, state


def _torch_run(make, params, grads_seq, lrs=None):
    """The same updates with a torch.optim optimizer (host and seed leaves in two groups)."""
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    groups = [{"params": ps[:2]}, {"params": ps[2:]}]
    if lrs is not None:
        groups[0]["lr"], groups[1]["lr"] = lrs
    opt = make(groups)
    for grads in grads_seq:
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps], opt


CASES = {
    "adam": (lambda: ef.optim.adam(1e-2), lambda p: torch.optim.Adam(p, lr=1e-2)),
    "adam L2": (lambda: ef.optim.adam(1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
                lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    "adamw": (lambda: ef.optim.adamw(1e-2, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
    "sgd": (lambda: ef.optim.sgd(0.05), lambda p: torch.optim.SGD(p, lr=0.05)),
    "sgd momentum L2": (lambda: ef.optim.sgd(0.05, momentum=0.9, weight_decay=1e-3),
                        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "sgd nesterov": (lambda: ef.optim.sgd(0.05, momentum=0.9, nesterov=True),
                     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_optimizer_equals_torch_optim_over_ten_steps(name, generator):
    make, ref = CASES[name]
    params = _leaves(generator)
    grads_seq = [_leaves(generator) for _ in range(10)]
    opt = make()
    got, state = _run(opt, params, grads_seq)
    want, topt = _torch_run(ref, params, grads_seq)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for i, p in enumerate(topt.param_groups[0]["params"] + topt.param_groups[1]["params"]):
        ts = topt.state[p]
        assert float(state["step"][i]) == 10.0
        if "exp_avg" in ts:
            torch.testing.assert_close(state["mu"][i], ts["exp_avg"], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(state["nu"][i], ts["exp_avg_sq"], rtol=1e-6, atol=1e-7)
        if ts.get("momentum_buffer") is not None:
            torch.testing.assert_close(state["momentum"][i], ts["momentum_buffer"], rtol=1e-6, atol=1e-7)


def test_per_group_learning_rates_equal_torch_param_groups(generator):
    params = _leaves(generator)
    grads_seq = [_leaves(generator) for _ in range(5)]
    got, _ = _run(ef.optim.adam({"host": 1e-2, "seeds": 3e-3}), params, grads_seq)
    want, _ = _torch_run(lambda p: torch.optim.Adam(p), params, grads_seq, lrs=(1e-2, 3e-3))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    frozen, _ = _run(ef.optim.adam({"host": 0.0, "seeds": 1e-2}), params, grads_seq)
    assert all(torch.equal(a, b) for a, b in zip(frozen[:2], params)) and not torch.equal(frozen[2], params[2])
    with pytest.raises(ef.ConfigError, match="no learning rate"):
        ef.optim.adam(1e-2).update_lists([("other", "w")], params[:1], params[:1], _state(ef.optim.adam(), params[:1]))


def _chain_update(t: eo.Transform, params, grads, state):
    """One update through a bare transform: the optimizer's count, `update`, `apply_updates`."""
    step = torch.stack(state["step"]) + 1
    ctx = eo.Context(tuple(k[0] for k in KEYS), step)
    upd, new = t.update(grads, {m: state[m] for m in t.mirrors}, params, ctx)
    return eo.apply_updates(params, upd, ctx), {"step": list(step.unbind(0)), **new}


@pytest.mark.parametrize("opt,pieces", [
    (ef.optim.adam(1e-2, weight_decay=0.1),
     lambda: eo.chain(eo.add_decayed_weights(0.1), eo.scale_by_adam(0.9, 0.999, 1e-8), eo.scale_by_learning_rate(1e-2))),
    (ef.optim.adamw({"host": 1e-2, "seeds": 3e-3}, weight_decay=0.1),
     lambda: eo.chain(eo.scale_by_adam(), eo.add_decayed_weights(0.1),
                      eo.scale_by_learning_rate({"host": 1e-2, "seeds": 3e-3}))),
    (ef.optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
     lambda: eo.chain(eo.add_decayed_weights(1e-3), eo.trace(0.9, nesterov=True), eo.scale_by_learning_rate(0.05))),
], ids=["adam", "adamw", "sgd"])
def test_a_chain_of_the_pieces_is_the_optimizer(opt, pieces, generator):
    t = pieces()
    params = _leaves(generator)
    state = _state(opt, params)
    assert ("step", *t.mirrors) == opt.mirrors
    init = t.init(params)
    assert set(init) == set(t.mirrors) and all(float(v.abs().sum()) == 0 for vs in init.values() for v in vs)
    a_p, a_s, b_p, b_s = params, state, params, state
    for _ in range(3):
        grads = _leaves(generator)
        a_p, a_s = opt.update_lists(KEYS, a_p, grads, a_s)
        b_p, b_s = _chain_update(t, b_p, grads, b_s)
    assert all(torch.equal(x, y) for x, y in zip(a_p, b_p))  # the same ops: the same bits
    assert all(torch.equal(x, y) for m in opt.mirrors for x, y in zip(a_s[m], b_s[m]))


def test_chain_errors_and_optimizer_descriptions():
    with pytest.raises(ef.ConfigError, match="owned twice"):
        eo.chain(eo.scale_by_adam(), eo.scale_by_adam())
    with pytest.raises(ef.ConfigError, match="betas"):
        eo.scale_by_adam(1.0)
    with pytest.raises(ef.ConfigError, match="momentum"):
        eo.trace(0.0)
    with pytest.raises(ef.ConfigError, match="weight_decay"):
        eo.add_decayed_weights(-1.0)
    with pytest.raises(ef.ConfigError, match="learning rates"):
        eo.scale_by_learning_rate(float("nan"))
    with pytest.raises(ef.ConfigError, match="unknown optimizer"):
        eo.Optimizer("lion", {"host": 1e-3, "seeds": 1e-3}, ("step",), {})
    a = ef.optim.adam(1e-2)
    with pytest.raises(ef.ConfigError, match="keeps mirrors"):  # e.g. a damaged checkpoint manifest
        eo.Optimizer("adam", dict(a.lr), ("step", "mu"), dict(a.hyper))
    # what checkpoints store rebuilds an equal optimizer; copies and pickles keep the rule
    assert eo.Optimizer(a.name, dict(a.lr), tuple(a.mirrors), dict(a.hyper)) == a == ef.optim.adam(1e-2)
    assert a != ef.optim.adam(1e-3) and a != ef.optim.adamw(1e-2)
    for b in (copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
        assert b == a and b.transform.mirrors == ("mu", "nu")


@pytest.mark.parametrize("make", [lambda: ef.optim.adam(1e-2, weight_decay=0.1), lambda: ef.optim.adamw(1e-2),
                                  lambda: ef.optim.sgd(0.05, momentum=0.9)], ids=["adam", "adamw", "sgd"])
def test_stacked_hosts_with_different_step_counts_equal_per_host_updates(make, generator):
    opt, n = make(), 3
    params, grads = _leaves(generator, n), _leaves(generator, n)
    state = {m: ([torch.tensor([0.0, 3.0, 40.0])] * len(SHAPES) if m == "step" else
                 [torch.rand(n, *s, generator=generator) for s in SHAPES]) for m in opt.mirrors}
    state["step"] = [s.clone() for s in state["step"]]
    state["step"][2] = torch.tensor([7.0, 0.0, 1.0])  # a seed grafted at another time on every host
    got_p, got_s = opt.update_lists(KEYS, params, grads, state)
    for j in range(n):
        want_p, want_s = opt.update_lists(KEYS, [p[j] for p in params], [g[j] for g in grads],
                                          {m: [v[j] for v in vs] for m, vs in state.items()})
        for a, b in zip(got_p, want_p):
            torch.testing.assert_close(a[j], b, rtol=1e-6, atol=0)
        for m in opt.mirrors:
            for a, b in zip(got_s[m], want_s[m]):
                torch.testing.assert_close(a[j], b, rtol=1e-6, atol=0)


def test_vmap_over_hosts_runs_the_leaf_by_leaf_form(generator):
    """foreach ops have no batching rule; ``foreach=False`` runs the same rule under torch.vmap."""
    opt, n = ef.optim.adamw({"host": 1e-2, "seeds": 3e-3}), 4
    params, grads = _leaves(generator, n), _leaves(generator, n)
    state = {m: ([torch.arange(n, dtype=torch.float32) * (i + 1) for i in range(len(SHAPES))] if m == "step" else
                 [torch.rand(n, *s, generator=generator) for s in SHAPES]) for m in opt.mirrors}
    stacked_p, stacked_s = opt.update_lists(KEYS, params, grads, state)
    one = lambda p, g, s: opt.update_lists(KEYS, p, g, s, foreach=False)  # noqa: E731
    vm_p, vm_s = torch.vmap(one)(params, grads, state)
    for a, b in zip(stacked_p, vm_p):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    for m in opt.mirrors:
        for a, b in zip(stacked_s[m], vm_s[m]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    loop_p, loop_s = opt.update_lists(KEYS, params, grads, state, foreach=False)
    assert all(torch.equal(a, b) for a, b in zip(stacked_p, loop_p))  # foreach or not: the same bits


@pytest.mark.parametrize("make", [lambda: ef.optim.adam(1e-2, weight_decay=0.1), lambda: ef.optim.adamw(1e-2),
                                  lambda: ef.optim.sgd(0.05, momentum=0.9, nesterov=True)],
                         ids=["adam", "adamw", "sgd"])
def test_donated_tensors_are_updated_in_place_and_nothing_else_changes(make, generator):
    opt = make()
    params = _leaves(generator)
    state = _state(opt, params)
    params, state = _run(opt, params, [_leaves(generator)])  # non-zero moments and counts
    grads = _leaves(generator)
    snap = lambda ts: [t.clone() for t in ts]  # noqa: E731
    g0, p0, s0 = snap(grads), snap(params), {m: snap(v) for m, v in state.items()}
    fresh_p, fresh_s = opt.update_lists(KEYS, params, grads, state)
    assert all(torch.equal(a, b) for a, b in zip(params, p0)) and all(torch.equal(a, b) for a, b in zip(grads, g0))
    assert all(torch.equal(a, b) for m in state for a, b in zip(state[m], s0[m]))  # inputs untouched
    assert not any(a is b for a, b in zip(fresh_p, params))
    # donate every leaf: the results are the donated tensors, updated in place, with the same values
    dp, ds = snap(params), {m: snap(v) for m, v in state.items()}
    don_p, don_s = opt.update_lists(KEYS, dp, grads, ds, donate=True)
    assert all(a is b for a, b in zip(don_p, dp)) and all(a is b for m in ds for a, b in zip(don_s[m], ds[m]))
    assert all(torch.equal(a, b) for a, b in zip(don_p, fresh_p))
    assert all(torch.equal(a, b) for m in ds for a, b in zip(don_s[m], fresh_s[m]))
    assert all(torch.equal(a, b) for a, b in zip(grads, g0))
    # donate some leaves: only those change; the values do not depend on it
    flags = [True, False, False, True]
    mp, ms = snap(params), {m: snap(v) for m, v in state.items()}
    mix_p, mix_s = opt.update_lists(KEYS, mp, grads, ms, donate=flags)
    for i, d in enumerate(flags):
        assert torch.equal(mix_p[i], fresh_p[i]) and (mix_p[i] is mp[i]) == d
        assert torch.equal(mp[i], fresh_p[i] if d else p0[i])
        for m in ms:
            assert torch.equal(mix_s[m][i], fresh_s[m][i]) and torch.equal(ms[m][i], fresh_s[m][i] if d else s0[m][i])


def test_bias_correction_in_the_parameters_dtype_and_dtypes_kept():
    """Step 1 of Adam moves every coordinate by lr * g / (|g| + eps / sqrt(bc2)) ~ lr exactly when the
    bias corrections are right; in float32 the direct ``1 - 0.999 ** 1`` cancels to 1e-5 relative."""
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-14)):
        p = [torch.zeros(5, 3, dtype=dtype)]
        grad = [torch.rand(5, 3, generator=g, dtype=dtype) + 0.5]
        opt = ef.optim.adam(1e-2, eps=0.0)
        state = {"step": [torch.zeros(())], "mu": [torch.zeros_like(p[0])], "nu": [torch.zeros_like(p[0])]}
        new_p, new_s = opt.update_lists([("host", "w")], p, grad, state)
        assert new_p[0].dtype == dtype and new_s["mu"][0].dtype == dtype and new_s["step"][0].dtype == torch.float32
        torch.testing.assert_close(new_p[0], torch.full_like(p[0], -1e-2), rtol=tol, atol=0)
        # step 1000: bc1 = 1 - 0.9 ** 1000 = 1, bc2 = 1 - 0.999 ** 1000
        state = {"step": [torch.tensor(999.0)], "mu": [torch.zeros_like(p[0])], "nu": [torch.zeros_like(p[0])]}
        new_p, _ = opt.update_lists([("host", "w")], p, grad, state)
        bc1, bc2 = 1 - 0.9 ** 1000, 1 - 0.999 ** 1000
        want = -1e-2 * (0.1 * grad[0] / bc1) / (math.sqrt(0.001 / bc2) * grad[0])
        torch.testing.assert_close(new_p[0], want, rtol=max(tol, 1e-13) * 10, atol=0)
    bf = [torch.randn(4, 4, generator=g).bfloat16()]
    for opt in (ef.optim.adam(1e-2), ef.optim.sgd(1e-2, momentum=0.9)):
        st = _state(opt, bf)
        new_p, new_s = opt.update_lists([("host", "w")], bf, [torch.ones_like(bf[0])], st)
        assert new_p[0].dtype == torch.bfloat16 and all(new_s[m][0].dtype == st[m][0].dtype for m in opt.mirrors)
        assert torch.all(new_p[0] < bf[0])


def test_no_private_fused_kernels_and_one_update_rule():
    root = Path(ef.__file__).parent
    for f in ("optim.py", "tezzeret.py", "_apply.py"):
        src = (root / f).read_text()
        assert "_fused_adam" not in src and "_fused_sgd" not in src, f
        assert "._sgd(" not in src and "._adam(" not in src and "_functional_update" not in src, f


@pytest.mark.parametrize("donate", [False, True])
def test_update_lists_returns_lists_the_caller_may_edit(donate, generator):
    opt = ef.optim.adam(1e-2)
    params = _leaves(generator)
    new_p, new_s = opt.update_lists(KEYS, params, _leaves(generator), _state(opt, params), donate=donate)
    assert type(new_p) is list and all(type(v) is list for v in new_s.values())
    assert new_p is not params
