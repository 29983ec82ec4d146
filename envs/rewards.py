"""Reward functions of `MorphogenesisEnv`: pure functions of a `RewardInputs` record.

A reward function maps the per-row quantities of one step (tensors of shape [N]) to a float32
reward [N]. The env builds the inputs from validation telemetry only: the test split never enters a
reward. Formulas, with ``acc`` the validation accuracy in [0, 1] after the step's epoch, ``p`` the
parameter ratio (parameters / the host's parameters at reset), ``Δx = x_t - x_{t-1}``, ``done`` the
last step of an episode, ``rb`` a governor rollback in this step, ``fail`` the governor ending the
episode:

* `delta_accuracy` (default): ``r = Δacc - rent·Δp - rollback_penalty·rb
  + done·terminal·acc - fail·failure_penalty``. Telescopes: the return is
  ``(1 + terminal)·acc_T - acc_0 - rent·(p_T - 1) - penalties``.
* `sparse_terminal`: ``r = done·(acc - rent·(p - 1)) - rollback_penalty·rb - fail·failure_penalty``.
* `contribution`: ``r = Σ_fossilized c - rent·Δp - rollback_penalty·rb + done·terminal·acc
  - fail·failure_penalty``, where ``c`` is the counterfactual contribution (validation accuracy with
  the seed minus without it, measured in the previous step's telemetry, the one the policy saw) of
  each seed that this step's action fossilized.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import Tensor

__all__ = ["Reward", "RewardInputs", "contribution", "delta_accuracy", "sparse_terminal"]


@dataclass(frozen=True)
class RewardInputs:
    """Per-row inputs of a reward function; every field is a tensor of shape [N].

    Attributes:
        val_accuracy: validation accuracy after this step (float32, [0, 1]).
        prev_val_accuracy: validation accuracy before this step (after the previous step or reset).
        param_ratio: parameters / parameters at reset, after this step (float32).
        prev_param_ratio: the same before this step.
        fossilized_contribution: summed contribution of the seeds this step's action fossilized
            (float32, accuracy points; 0 when nothing was fossilized).
        rolled_back: the governor rolled this step back (bool).
        failed: the governor ended the episode (too many rollbacks) (bool).
        done: this is the episode's last step (failed, or the epoch budget is spent) (bool).
    """

    val_accuracy: Tensor
    prev_val_accuracy: Tensor
    param_ratio: Tensor
    prev_param_ratio: Tensor
    fossilized_contribution: Tensor
    rolled_back: Tensor
    failed: Tensor
    done: Tensor


Reward = Callable[[RewardInputs], Tensor]
"""``reward(inputs) -> float32 [N]``."""


def _delta_accuracy(x: RewardInputs, *, rent: float, terminal: float, rollback_penalty: float,
                    failure_penalty: float) -> Tensor:
    r = (x.val_accuracy - x.prev_val_accuracy) - rent * (x.param_ratio - x.prev_param_ratio)
    r = r + terminal * x.done.float() * x.val_accuracy
    return r - rollback_penalty * x.rolled_back.float() - failure_penalty * x.failed.float()


def _sparse_terminal(x: RewardInputs, *, rent: float, rollback_penalty: float, failure_penalty: float) -> Tensor:
    r = x.done.float() * (x.val_accuracy - rent * (x.param_ratio - 1.0))
    return r - rollback_penalty * x.rolled_back.float() - failure_penalty * x.failed.float()


def _contribution(x: RewardInputs, *, rent: float, terminal: float, rollback_penalty: float,
                  failure_penalty: float) -> Tensor:
    r = x.fossilized_contribution - rent * (x.param_ratio - x.prev_param_ratio)
    r = r + terminal * x.done.float() * x.val_accuracy
    return r - rollback_penalty * x.rolled_back.float() - failure_penalty * x.failed.float()


def delta_accuracy(rent: float = 0.1, terminal: float = 1.0, rollback_penalty: float = 0.05,
                   failure_penalty: float = 1.0) -> Reward:
    """Dense reward: the per-epoch change in validation accuracy, minus a rent on the change in
    parameter ratio, plus ``terminal`` x the final validation accuracy (see the module docstring).

    Args:
        rent: cost per unit of parameter ratio (0.1: a seed that adds 20% of the host's parameters
            must lift validation accuracy by 2 points to pay for itself).
        terminal: weight of the final validation accuracy, paid on the last step.
        rollback_penalty: paid on every governor rollback.
        failure_penalty: paid when the governor ends the episode.
    """
    return partial(_delta_accuracy, rent=rent, terminal=terminal, rollback_penalty=rollback_penalty,
                   failure_penalty=failure_penalty)


def sparse_terminal(rent: float = 0.1, rollback_penalty: float = 0.05, failure_penalty: float = 1.0) -> Reward:
    """Sparse reward: 0 until the last step, then final validation accuracy minus
    ``rent·(p_T - 1)`` (rollback and failure penalties are paid when they happen)."""
    return partial(_sparse_terminal, rent=rent, rollback_penalty=rollback_penalty, failure_penalty=failure_penalty)


def contribution(rent: float = 0.1, terminal: float = 1.0, rollback_penalty: float = 0.05,
                 failure_penalty: float = 1.0) -> Reward:
    """Contribution-based reward: a fossilization earns the seed's measured contribution; rent,
    terminal term and penalties as in `delta_accuracy`."""
    return partial(_contribution, rent=rent, terminal=terminal, rollback_penalty=rollback_penalty,
                   failure_penalty=failure_penalty)


REWARDS: dict[str, Callable[[], Reward]] = {
    "delta_accuracy": delta_accuracy,
    "sparse_terminal": sparse_terminal,
    "contribution": contribution,
}
