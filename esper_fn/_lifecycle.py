"""Seed lifecycle: stages, the one transition table, alpha schedules and gates.

The transition table `TRANSITIONS` is the single source of truth for what is legal: the lifecycle
ops check it, `legal_ops` derives action masks from it, and error messages quote it.
"""

from __future__ import annotations

import difflib
import enum
import math
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from ._errors import GateError, GraftError, IllegalTransitionError, MissingTelemetryError


class Stage(enum.IntEnum):
    """Lifecycle stage of one seed slot."""

    DORMANT = 0
    GERMINATED = 1
    TRAINING = 2
    BLENDING = 3
    HOLDING = 4
    FOSSILIZED = 5
    PRUNED = 6
    EMBARGOED = 7


class Op(enum.IntEnum):
    """Operations a controller (or a user) can request on a slot."""

    WAIT = 0
    GERMINATE = 1
    ADVANCE = 2
    FOSSILIZE = 3
    PRUNE = 4


LIVE_STAGES = frozenset({Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.HOLDING})
"""Stages in which a seed exists and can still be removed."""

SEEDED_STAGES = LIVE_STAGES | {Stage.FOSSILIZED}
"""Stages in which the slot holds seed parameters."""

# (stage, op) -> next stage. Anything absent is illegal. WAIT is legal everywhere.
TRANSITIONS: Mapping[tuple[Stage, Op], Stage] = {
    (Stage.DORMANT, Op.GERMINATE): Stage.GERMINATED,
    (Stage.GERMINATED, Op.ADVANCE): Stage.TRAINING,
    (Stage.TRAINING, Op.ADVANCE): Stage.BLENDING,
    (Stage.BLENDING, Op.ADVANCE): Stage.HOLDING,
    (Stage.HOLDING, Op.FOSSILIZE): Stage.FOSSILIZED,
    **{(s, Op.PRUNE): Stage.PRUNED for s in LIVE_STAGES},
    # PRUNED -> EMBARGOED -> DORMANT happen by `tick`, not by a request.
}

# Transitions driven by the clock (`tick`), for documentation and for `check_transition`.
TIMED_TRANSITIONS: Mapping[Stage, Stage] = {
    Stage.PRUNED: Stage.EMBARGOED,
    Stage.EMBARGOED: Stage.DORMANT,
}


def legal_ops(stage: Stage) -> tuple[Op, ...]:
    """The ops that the transition table allows from `stage` (WAIT always included)."""
    return (Op.WAIT,) + tuple(op for (s, op) in TRANSITIONS if s == stage)


def check_transition(slot: str, stage: Stage, op: Op) -> Stage:
    """Return the stage `op` leads to from `stage`, or raise `IllegalTransitionError`.

    Raises:
        IllegalTransitionError: naming the slot, its stage, the request and the legal alternatives.
    """
    if op == Op.WAIT:
        return stage
    nxt = TRANSITIONS.get((stage, op))
    if nxt is None:
        legal = ", ".join(o.name for o in legal_ops(stage))
        sources = sorted({s.name for (s, o) in TRANSITIONS if o == op})
        raise IllegalTransitionError(
            f"slot {slot!r} is {stage.name}; {op.name} is legal only from {' or '.join(sources)}. "
            f"Legal from {stage.name}: {legal}. Mask actions with `esper_fn.legal_actions(...)`."
        )
    return nxt


# --- alpha schedules ---------------------------------------------------------------------------

CURVES = ("linear", "cosine", "sigmoid")


def alpha_at(curve: str, progress: float) -> float:
    """Alpha for a blending ramp at `progress` in [0, 1] (clamped); 0 at the start, exactly 1 at the end.

    Args:
        curve: one of "linear", "cosine", "sigmoid".
        progress: fraction of the tempo elapsed.
    """
    p = min(max(progress, 0.0), 1.0)
    if p >= 1.0:
        return 1.0
    if curve == "linear":
        return p
    if curve == "cosine":
        return 0.5 - 0.5 * math.cos(math.pi * p)
    if curve == "sigmoid":
        # A logistic curve rescaled so that it passes exactly through (0, 0) and (1, 1).
        k = 10.0
        lo, hi = 1 / (1 + math.exp(k / 2)), 1 / (1 + math.exp(-k / 2))
        return (1 / (1 + math.exp(-k * (p - 0.5))) - lo) / (hi - lo)
    raise GraftError(f"unknown alpha curve {curve!r}; choose one of {CURVES}.")


# --- gates -------------------------------------------------------------------------------------


class GateConfig(BaseModel):
    """Thresholds for the lifecycle gates. Every field is checked by a pure predicate in `check_gate`.

    Which gates are on by default: the epoch counts (0, so they pass), the contribution gate
    (``min_contribution=0.0`` with ``contribution_z=1.645``: fossilize only a seed whose measured
    help is significantly above zero) and the embargo. The gradient gate is off
    (``max_grad_norm=None``). A gate that is on reads its measurement from the telemetry and refuses
    with `MissingTelemetryError` (naming the key) when it is absent: it never passes blind. Set a
    threshold to None to switch its gate off.

    Attributes:
        min_training_epochs: epochs a seed must incubate (TRAINING) before it may blend.
        min_holding_epochs: epochs at alpha 1 (HOLDING) before it may be fossilized.
        max_grad_norm: leaving TRAINING needs the seed's gradient norm (telemetry
            ``grad_norm/<slot>``) finite and <= this; None (the default) switches the gate off.
        min_contribution: fossilizing needs the lower confidence bound of the seed's measured
            contribution, ``<slot>/contribution - contribution_z * <slot>/contribution_se``
            (validation accuracy with the seed minus without it, and the standard error of that
            paired per-sample difference; accuracy points in [-1, 1]), to be strictly above this.
            None switches the gate off. The default 0.0 keeps only seeds that measurably help: a
            seed measured at exactly 0 (no sample changed) is refused.
        contribution_z: the z of that bound: 1.645 (default) is a one-sided 95% bound for large
            validation sets; 0 compares the measured contribution alone (and reads no standard error).
        embargo_epochs: epochs a pruned slot stays EMBARGOED before it is DORMANT again.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_training_epochs: int = Field(default=0, ge=0)
    min_holding_epochs: int = Field(default=0, ge=0)
    max_grad_norm: float | None = Field(default=None, gt=0)
    min_contribution: float | None = Field(default=0.0)
    contribution_z: float = Field(default=1.645, ge=0)
    embargo_epochs: int = Field(default=2, ge=0)


def _measure(telemetry: Mapping[str, float] | None, key: str, slot: str, what: str) -> float:
    """``telemetry[key]`` as a float, or `MissingTelemetryError` naming the key and the keys given."""
    if telemetry is None or key not in telemetry:
        if not telemetry:
            got = "got no telemetry"
        else:
            keys = sorted(telemetry)
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            got = (f"got keys {keys[:12]}{' ...' if len(keys) > 12 else ''}"
                   + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise MissingTelemetryError(
            f"slot {slot!r}: the {what} gate reads telemetry key {key!r}, and {got}. Pass the epoch's telemetry "
            "(`esper_fn.training.telemetry(state, task, train_metrics)`, with train metrics from `train_epoch` or "
            "`esper_fn.training.grad_norms`), switch the gate off in GateConfig (its threshold None), or pass "
            "force=True."
        )
    v = telemetry[key]
    try:
        return float(v)
    except (TypeError, ValueError):
        raise GateError(f"slot {slot!r}: telemetry {key!r} is {v!r}, not a number; the {what} gate cannot read it."
                        ) from None


def check_gate(
    slot: str,
    stage: Stage,
    op: Op,
    epochs_in_stage: int,
    gates: GateConfig,
    telemetry: Mapping[str, float] | None = None,
) -> None:
    """Raise `GateError` if `gates` refuse `op` on a slot in `stage`; return None if it passes.

    The epoch counts are checked first; a gate that then reads telemetry raises
    `MissingTelemetryError` where its key is absent (never passes blind).

    Args:
        slot: slot name, for the message.
        stage: current stage.
        op: requested op (already legal by the transition table).
        epochs_in_stage: epochs the slot has spent in `stage`.
        gates: thresholds.
        telemetry: the telemetry dict as `esper_fn.training.telemetry` emits it; the gates read
            ``"grad_norm/<slot>"`` (the seed's gradient norm, when ``max_grad_norm`` is set),
            ``"<slot>/contribution"`` and ``"<slot>/contribution_se"`` (accuracy points; the
            standard error only when ``contribution_z > 0``).

    Raises:
        GateError: a gate refused (the message names the condition and the measured value).
        MissingTelemetryError: a gate that is on cannot find its key.
    """
    if stage == Stage.TRAINING and op == Op.ADVANCE:
        if epochs_in_stage < gates.min_training_epochs:
            raise GateError(
                f"slot {slot!r} has incubated {epochs_in_stage} epoch(s); blending needs "
                f"min_training_epochs={gates.min_training_epochs}. Wait, or pass force=True."
            )
        if gates.max_grad_norm is not None:
            g = _measure(telemetry, f"grad_norm/{slot}", slot, f"gradient (max_grad_norm={gates.max_grad_norm})")
            if not (math.isfinite(g) and g <= gates.max_grad_norm):
                raise GateError(
                    f"slot {slot!r} gradient norm is {g}; blending needs a finite norm <= "
                    f"max_grad_norm={gates.max_grad_norm}. Prune the seed or pass force=True."
                )
    if stage == Stage.HOLDING and op == Op.FOSSILIZE:
        if epochs_in_stage < gates.min_holding_epochs:
            raise GateError(
                f"slot {slot!r} has held {epochs_in_stage} epoch(s); fossilizing needs "
                f"min_holding_epochs={gates.min_holding_epochs}. Wait, or pass force=True."
            )
        if gates.min_contribution is not None:
            what = f"contribution (min_contribution={gates.min_contribution}, contribution_z={gates.contribution_z})"
            c = _measure(telemetry, f"{slot}/contribution", slot, what)
            se = _measure(telemetry, f"{slot}/contribution_se", slot, what) if gates.contribution_z > 0 else 0.0
            bound = c - gates.contribution_z * se if gates.contribution_z > 0 else c
            if not bound > gates.min_contribution:  # NaN refuses too
                detail = (f"its lower bound {bound:+.4f} (contribution {c:+.4f} - {gates.contribution_z} x standard "
                          f"error {se:.4f})" if gates.contribution_z > 0 else f"its measured contribution {c:+.4f}")
                raise GateError(
                    f"slot {slot!r}: fossilizing needs evidence that the seed helps: {detail} must exceed "
                    f"min_contribution={gates.min_contribution}. Prune it instead, measure on more validation "
                    "samples, or pass force=True."
                )
