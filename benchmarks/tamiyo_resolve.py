"""Tamiyo with the "finish what you start" rule (`esper_fn.policies.ResolvingPolicy`) as a benchmark
comparator, for `esper-fn bench run --controllers py:tamiyo_resolve:factory` (with ``PYTHONPATH=benchmarks``).

``TAMIYO_WEIGHTS`` names the weights (default: the shipped policy). The rule reads the env's gates:
growthbench-v1's envs use the env default, ``GateConfig(min_training_epochs=3, max_grad_norm=1e3)``.

    PYTHONPATH=benchmarks esper-fn bench run --suite growthbench-v1 --split train \\
        --controllers tamiyo,py:tamiyo_resolve:factory,py:tamiyo_resolve:helping,py:tamiyo_resolve:helping_late,\\
recipe:input-conv-0,static --seeds 900000-900004 --train-seeds 0-4 --workers 2 --out runs/sel-resolve
"""

from __future__ import annotations

import os


def _resolving(space, **variant):
    from esper_fn import GateConfig
    from esper_fn.policies import SHIPPED_WEIGHTS, ResolvingPolicy
    from esper_fn.policies._eval import tamiyo_policy

    weights = os.environ.get("TAMIYO_WEIGHTS", str(SHIPPED_WEIGHTS))
    return ResolvingPolicy(tamiyo_policy(weights, space), space, GateConfig(min_training_epochs=3, max_grad_norm=1e3),
                           **variant)


def factory(space):
    """`py:tamiyo_resolve:factory`: Tamiyo with rules (1) and (2)."""
    return _resolving(space)


def helping(space):
    """`py:tamiyo_resolve:helping`: (1) and (2), pruning only seeds whose contribution is not above zero."""
    return _resolving(space, keep_helping=True)


def helping_late(space):
    """`py:tamiyo_resolve:helping_late`: (2) only, pruning only seeds whose contribution is not above zero."""
    return _resolving(space, keep_helping=True, block_late=False)
