"""The growth benchmark's statistics and report: pure functions over the `RunRecord`s of a runs.csv.

A benchmark run (``esper-fn bench run``) writes one `RunRecord` per (comparator, instance, seed), with
``instance``, ``split`` ("train" or "test") and ``param_budget`` set. Comparators are named by strings;
the members of the **family** of fixed action sequences are the comparators whose names start with
``"recipe:"`` (or a list given as ``members=``). From the family's runs:

* **a\\*** (`astar`): the single member with the best mean validation accuracy over the TRAIN split,
  each instance weighted equally (the mean over seeds per instance, then the mean over instances);
  ties (within 1e-12) go to fewer mean parameters (weighted the same way), then to the name. Only
  train-split records are read: test data never reaches the choice.
* **the oracle** (`oracle`): the best member PER INSTANCE, cross-fitted so that it is never scored
  on the seeds it was chosen on. An instance's seeds are sorted and dealt round-robin into `folds`
  folds (the j-th smallest seed goes to fold ``j % folds``); for each fold, the member with the best
  mean test accuracy over the seeds of the OTHER folds (pooled; same tie rule) is chosen, and each
  seed of the fold is scored by that member's test accuracy on that seed.
* **the headroom** (`headroom`): ``oracle - a*`` on the test split, paired by (instance, seed): one
  difference per pair. Per instance: the mean over its seeds, the 95% Student-t CI half-width of that
  mean (``t(0.975, n - 1) * sd / sqrt(n)``, `mean_ci`) and n, the number of seeds. Overall: the mean
  over ALL (instance, seed) pairs and the Student-t CI with the pair as the unit (n = pairs, n - 1
  degrees of freedom). With the same seeds on every instance (the benchmark's protocol) the overall
  mean is the mean of the per-instance means. The pooled standard deviation includes the spread
  BETWEEN instances' headrooms, so the overall CI is usually wider (more conservative) than a stratified one
  for this fixed set of instances; it is not a CI over a population of instances (that would need the
  instance as the unit). The cross-fitted choice also makes the pairs of one instance weakly
  dependent (one fold's choice depends on the other folds' seeds), which the t-interval ignores.
* **headroom captured** by a comparator C (`captured`): ``mean(C - a*) / mean(oracle - a*)`` over the
  same (instance, seed) pairs, with the paired CI of ``C - a*``: 0 is a\\*, 1 is the oracle; nan where
  the headroom is exactly 0. A ratio of two noisy means: read it with the CI of ``C - a*``.
* **seeds needed** (`seeds_needed`): the smallest number of pairs n for which a two-sided paired
  t-test at level alpha rejects "no difference" with probability >= power, when the true mean
  difference is delta and the standard deviation of a difference is the observed one. Exact: the
  power is that of the noncentral t distribution (``scipy.stats.nct``, df = n - 1, noncentrality
  ``delta * sqrt(n) / sd``, both tails), not the normal approximation.

`leaderboard` writes the markdown report, `plot_bench` the PNGs, `read_runs` / `write_runs` the
runs.csv (the `RunRecord` columns of `esper_fn.policies._eval.write_csv`).

Every function is pure (the records are never modified) and raises `ConfigError` on bad input: no
train-split records, a member missing on some (instance, seed) (named), a run recorded twice, a
non-finite score, an unknown split or key.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

from esper_fn._errors import ConfigError

from ._eval import RunRecord, mean_ci, read_csv, write_csv

__all__ = ["FAMILY_PREFIX", "BenchStats", "Captured", "Difference", "Headroom", "OraclePick", "Paired", "astar",
           "bench_stats", "captured", "difference", "family", "headroom", "leaderboard", "oracle", "plot_bench", "read_runs", "seeds_needed",
           "write_runs"]

FAMILY_PREFIX = "recipe:"
"""Comparators whose names start with this are members of the family of fixed action sequences."""

SPLITS = ("train", "test")
_MAX_PAIRS = 10**8  # seeds_needed gives up above this
_TIE = 1e-12  # scores closer than this are a tie (the same runs summed in another order differ by ulps)
_NUMERIC = tuple(f.name for f in fields(RunRecord) if f.type in ("int", "float"))

Cell = tuple[str, int]
"""An (instance, seed) pair: the unit of pairing."""


class Paired(NamedTuple):
    """A mean difference with its 95% Student-t CI half-width (nan for n < 2) and the number of pairs."""

    mean: float
    half: float
    n: int


@dataclass(frozen=True)
class OraclePick:
    """The oracle on one (instance, seed): the member chosen on the other folds, its score on this
    seed, and the seed's fold."""

    member: str
    score: float
    fold: int


@dataclass(frozen=True)
class Headroom:
    """``oracle - a*`` paired by (instance, seed).

    Attributes:
        per_instance: instance -> `Paired` over its seeds.
        overall: `Paired` over all (instance, seed) pairs (the pair is the CI's unit).
        diffs: (instance, seed) -> the difference (the pairs, for `seeds_needed`).
    """

    per_instance: dict[str, Paired]
    overall: Paired
    diffs: dict[Cell, float]


@dataclass(frozen=True)
class Captured:
    """The share of the headroom a comparator captures.

    Attributes:
        comparator: its name.
        fraction: ``mean(C - a*) / mean(oracle - a*)`` over the pairs the comparator has (nan where the
            headroom is 0).
        gain: `Paired` of ``C - a*`` over those pairs.
        per_instance: instance -> (fraction, `Paired` of ``C - a*``) over that instance's seeds.
    """

    comparator: str
    fraction: float
    gain: Paired
    per_instance: dict[str, tuple[float, Paired]]


@dataclass(frozen=True)
class BenchStats:
    """a\\*, the oracle and the headroom in one record (`bench_stats`).

    Attributes:
        astar: the a\\* member's name.
        astar_table: every member's train score (mean validation accuracy), best first.
        oracle: (instance, seed) -> `OraclePick` on `split`.
        headroom: ``oracle - a*`` on `split`.
        split: the split the oracle and the headroom are on.
        folds: the oracle's cross-fitting folds.
    """

    astar: str
    astar_table: dict[str, float]
    oracle: dict[Cell, OraclePick]
    headroom: Headroom
    split: str
    folds: int


# --- the records as grids -------------------------------------------------------------------------------------


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {list(SPLITS)}, got {split!r}.")


def _check_key(key: str) -> None:
    if key not in _NUMERIC:
        raise ConfigError(f"key {key!r} is not a numeric RunRecord field; use one of {list(_NUMERIC)}.")


def family(records: Iterable[RunRecord], split: str | None = None) -> list[str]:
    """The family's members present in `records` (on `split`, or on any split for None), sorted.

    Args:
        records: benchmark records.
        split: "train", "test" or None.

    Returns:
        The sorted names that start with ``FAMILY_PREFIX``.
    """
    if split is not None:
        _check_split(split)
    return sorted({r.controller for r in records if r.controller.startswith(FAMILY_PREFIX)
                   and (split is None or r.split == split)})


def _cells(records: Iterable[RunRecord], name: str, split: str) -> dict[Cell, RunRecord]:
    """One comparator's runs on a split by (instance, seed).

    Raises:
        ConfigError: a run recorded twice, or a benchmark run without an instance name.
    """
    out: dict[Cell, RunRecord] = {}
    for r in records:
        if r.controller != name or r.split != split:
            continue
        if not r.instance:
            raise ConfigError(f"{name!r} has a {split}-split run (seed {r.seed}) without an instance name.")
        if (r.instance, r.seed) in out:
            raise ConfigError(f"{name!r} has two {split}-split runs on instance {r.instance!r}, seed {r.seed}: a "
                              "runs.csv merged twice? Keep one run per (comparator, instance, seed).")
        out[(r.instance, r.seed)] = r
    return out


def _value(r: RunRecord, key: str) -> float:
    v = float(getattr(r, key))
    if not math.isfinite(v):
        raise ConfigError(f"{r.controller!r} on instance {r.instance!r}, seed {r.seed} ({r.split}) has {key} = {v}; "
                          "a failed run must be rerun, not scored.")
    return v


def _grid(records: Sequence[RunRecord], split: str, members: Sequence[str] | None,
          keys: Sequence[str]) -> tuple[list[str], dict[str, dict[Cell, RunRecord]]]:
    """The family on a split as member -> (instance, seed) -> record, complete.

    Raises:
        ConfigError: no member, no record of the family on the split, a member missing on some
            (instance, seed) (named), a duplicate run, an unknown key, a non-finite value of a key.
    """
    _check_split(split)
    for k in keys:
        _check_key(k)
    if members is None:
        names = family(records, split)
        if not names:
            raise ConfigError(f"no {split}-split records of the family: no comparator named {FAMILY_PREFIX!r}... ran "
                              f"on the {split} split. Run the family (esper-fn bench run --split {split}) or pass "
                              "members=.")
    else:
        names = list(dict.fromkeys(members))
        if not names:
            raise ConfigError("members= is empty; name at least one family member.")
    grid = {m: _cells(records, m, split) for m in names}
    union = set().union(*grid.values())
    if not union:
        raise ConfigError(f"no {split}-split records of the members {names}.")
    for m in names:
        missing = sorted(union - set(grid[m]))
        if missing:
            shown = ", ".join(f"{i}/seed {s}" for i, s in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ConfigError(f"family member {m!r} is missing {len(missing)} of the {len(union)} {split}-split "
                              f"(instance, seed) runs the other members have: {shown}. Rerun it there (bench run "
                              "is resumable) or leave it out with members=.")
        for r in grid[m].values():
            for k in keys:
                _value(r, k)
    return names, grid


def _same_family(records: Sequence[RunRecord], split: str) -> None:
    """Raises ConfigError when the "recipe:" comparators of the train split and of `split` differ."""
    on_train, on_split = set(family(records, "train")), set(family(records, split))
    if on_split and on_train != on_split:
        raise ConfigError(f"the family differs between the train and {split} splits: only on train "
                          f"{sorted(on_train - on_split)}, only on {split} {sorted(on_split - on_train)}. Run "
                          "every member on both or pass members=.")


def _by_instance(cells: Iterable[Cell]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, s in sorted(cells):
        out.setdefault(i, []).append(s)
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _rank(names: Sequence[str], score: Mapping[str, float], params: Mapping[str, float]) -> list[str]:
    """Best first: higher score; a tie (within `_TIE`) goes to fewer params, then to the name."""
    left, out = list(names), []
    while left:
        top = max(score[m] for m in left)
        best = min((m for m in left if score[m] >= top - _TIE), key=lambda m: (params[m], m))
        out.append(best)
        left.remove(best)
    return out


# --- a*, the oracle, the headroom --------------------------------------------------------------------------------


def astar(records: Sequence[RunRecord], *, members: Sequence[str] | None = None,
          key: str = "val_accuracy") -> tuple[str, dict[str, float]]:
    """The best fixed policy: the family member with the best mean `key` over the TRAIN split.

    Each instance weighs the same: the mean over its seeds, then the mean over instances. Ties
    (within 1e-12) go to fewer mean parameters (weighted the same way), then to the name. Only
    ``split == "train"`` records are read.

    Args:
        records: benchmark records (any splits; the test split is ignored).
        members: the family (default: every train-split comparator whose name starts with "recipe:").
        key: the numeric `RunRecord` field to maximise (default: final validation accuracy).

    Returns:
        (a\\*'s name, member -> score, best first).

    Raises:
        ConfigError: no train-split family records, a member missing on some train (instance, seed)
            (named), a duplicate run, an unknown key or a non-finite value.
    """
    names, grid = _grid(records, "train", members, (key, "params"))
    score, params = {}, {}
    for m in names:
        per = _by_instance(grid[m])
        score[m] = _mean([_mean([_value(grid[m][(i, s)], key) for s in ss]) for i, ss in per.items()])
        params[m] = _mean([_mean([grid[m][(i, s)].params for s in ss]) for i, ss in per.items()])
    order = _rank(names, score, params)
    return order[0], {m: score[m] for m in order}


def _fold_of(seeds: Sequence[int], folds: int) -> dict[int, int]:
    """Sorted seeds dealt round-robin: the j-th smallest seed is in fold ``j % folds``."""
    return {s: j % folds for j, s in enumerate(sorted(seeds))}


def oracle(records: Sequence[RunRecord], *, members: Sequence[str] | None = None, key: str = "test_accuracy",
           folds: int = 2, split: str = "test", score: str = "test_accuracy") -> dict[Cell, OraclePick]:
    """The per-instance oracle, cross-fitted by seed: never scored on the seeds it was chosen on.

    For each instance of `split`, the seeds are sorted and dealt round-robin into `folds` folds (the
    j-th smallest seed into fold ``j % folds``). For each fold, the member with the best mean `key`
    over the seeds of the other folds (pooled; ties as `astar`: fewer mean parameters over those seeds,
    then the name) is chosen, and each seed of the fold gets that member's `score` on that seed.

    Args:
        records: benchmark records (only `split` is read).
        members: the family (default: every comparator on `split` whose name starts with "recipe:").
        key: what the choice maximises (default: test accuracy, honest because cross-fitted).
        folds: the number of folds (>= 2; every instance needs at least `folds` seeds).
        split: "test" (the headroom's split) or "train".
        score: what each seed is scored by (default: test accuracy, the benchmark's one rule).

    Returns:
        (instance, seed) -> `OraclePick` (member, score, fold), sorted by instance then seed.

    Raises:
        ConfigError: folds < 2, an instance with fewer seeds than folds, no family records on the
            split, a member missing on some (instance, seed) (named), a duplicate run, an unknown key.
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"folds must be an int >= 2 (the oracle is chosen on other seeds), got {folds!r}.")
    names, grid = _grid(records, split, members, (key, score, "params"))
    out: dict[Cell, OraclePick] = {}
    for inst, seeds in _by_instance(grid[names[0]]).items():
        if len(seeds) < folds:
            raise ConfigError(f"instance {inst!r} has {len(seeds)} {split}-split seeds; {folds}-fold cross-fitting "
                              f"needs at least {folds}. Run more seeds or lower folds.")
        fold = _fold_of(seeds, folds)
        for f in range(folds):
            fit = [s for s in seeds if fold[s] != f]
            sc = {m: _mean([_value(grid[m][(inst, s)], key) for s in fit]) for m in names}
            pa = {m: _mean([grid[m][(inst, s)].params for s in fit]) for m in names}
            pick = _rank(names, sc, pa)[0]
            for s in seeds:
                if fold[s] == f:
                    out[(inst, s)] = OraclePick(pick, _value(grid[pick][(inst, s)], score), f)
    return dict(sorted(out.items()))


def _paired_diffs(diffs: Mapping[Cell, float]) -> tuple[dict[str, Paired], Paired]:
    per = {}
    for inst, seeds in _by_instance(diffs).items():
        xs = [diffs[(inst, s)] for s in seeds]
        per[inst] = Paired(*mean_ci(xs), len(xs))
    xs = [diffs[c] for c in sorted(diffs)]
    return per, Paired(*mean_ci(xs), len(xs))


def headroom(records: Sequence[RunRecord], *, astar_name: str, oracle_scores: Mapping[Cell, OraclePick],
             split: str = "test", score: str = "test_accuracy") -> Headroom:
    """``oracle - a*`` paired by (instance, seed), per instance and over all pairs.

    Args:
        records: benchmark records (a\\*'s runs on `split` are read).
        astar_name: a\\*'s member name (from `astar`).
        oracle_scores: from `oracle` on the same split and score.
        split: the split of the pairs.
        score: the field a\\* is scored by (the oracle's `score`).

    Returns:
        `Headroom`: per instance, the mean over its seeds with the 95% Student-t CI half-width and n
        seeds; overall, the mean over all (instance, seed) pairs with the CI over pairs (n = pairs);
        and the differences themselves.

    Raises:
        ConfigError: no oracle scores, a\\* missing on a pair the oracle has (named), a duplicate run.
    """
    _check_split(split)
    _check_key(score)
    if not oracle_scores:
        raise ConfigError("oracle_scores is empty: compute it with oracle(records, split=...).")
    a = _cells(records, astar_name, split)
    missing = sorted(set(oracle_scores) - set(a))
    if missing:
        raise ConfigError(f"a* {astar_name!r} has no {split}-split run on {len(missing)} (instance, seed) pairs the "
                          f"oracle has, e.g. {missing[:3]}: compute the oracle on split={split!r}, with a* in its "
                          "family.")
    diffs = {c: p.score - _value(a[c], score) for c, p in sorted(oracle_scores.items())}
    per, overall = _paired_diffs(diffs)
    return Headroom(per, overall, diffs)


def captured(records: Sequence[RunRecord], comparator: str, *, astar_name: str,
             oracle_scores: Mapping[Cell, OraclePick], split: str = "test", score: str = "test_accuracy") -> Captured:
    """The share of the headroom comparator C captures: ``mean(C - a*) / mean(oracle - a*)``.

    Both means are over the same (instance, seed) pairs: those of the oracle that C has (C's pair
    count is `Captured.gain.n`; a comparator that ran on fewer seeds is compared on those).

    Args:
        records: benchmark records.
        comparator: C's name.
        astar_name, oracle_scores, split, score: as `headroom`.

    Returns:
        `Captured`: the fraction (nan where the headroom is 0) and the paired CI of ``C - a*``, overall
        (pairs as the unit) and per instance.

    Raises:
        ConfigError: C has none of the oracle's pairs on `split`, and `headroom`'s errors.
    """
    hr = headroom(records, astar_name=astar_name, oracle_scores=oracle_scores, split=split, score=score)
    c = _cells(records, comparator, split)
    common = sorted(set(hr.diffs) & set(c))
    if not common:
        raise ConfigError(f"comparator {comparator!r} has no {split}-split run on the oracle's (instance, seed) pairs.")
    a = _cells(records, astar_name, split)
    gain = {k: _value(c[k], score) - _value(a[k], score) for k in common}
    room = {k: hr.diffs[k] for k in common}
    per_gain, overall = _paired_diffs(gain)
    per_room, room_all = _paired_diffs(room)

    def frac(g: float, h: float) -> float:
        return g / h if h != 0 else float("nan")

    per = {i: (frac(per_gain[i].mean, per_room[i].mean), per_gain[i]) for i in per_gain}
    return Captured(comparator, frac(overall.mean, room_all.mean), overall, per)


class Difference(NamedTuple):
    """``a - b`` paired by (instance, seed): per instance and over all pairs, and the pairs themselves."""

    per_instance: dict[str, Paired]
    overall: Paired
    diffs: dict[Cell, float]


def difference(records: Sequence[RunRecord], a: str, b: str, *, split: str = "test",
               key: str = "test_accuracy") -> Difference:
    """Comparator `a` minus comparator `b` on `key`, paired by (instance, seed) over the pairs both ran
    on `split`: per instance, the mean over its seeds with the 95% Student-t CI half-width; overall,
    the mean over all pairs with the CI over pairs (the unit and the caveats of `headroom`).

    Raises:
        ConfigError: an unknown split or key, no common pair, a duplicate run, a non-finite value.
    """
    _check_split(split)
    _check_key(key)
    ca, cb = _cells(records, a, split), _cells(records, b, split)
    common = sorted(set(ca) & set(cb))
    if not common:
        raise ConfigError(f"{a!r} and {b!r} share no {split}-split (instance, seed) run: run both on the same seeds.")
    diffs = {c: _value(ca[c], key) - _value(cb[c], key) for c in common}
    per, overall = _paired_diffs(diffs)
    return Difference(per, overall, diffs)


def bench_stats(records: Sequence[RunRecord], *, members: Sequence[str] | None = None, folds: int = 2,
                split: str = "test") -> BenchStats:
    """a\\* (train split, validation accuracy), the cross-fitted oracle and the headroom on `split`, in
    one call, with one family for both.

    Args:
        records: benchmark records.
        members: the family (default: the "recipe:" comparators; they must be the same on both splits).
        folds: the oracle's folds.
        split: the split of the oracle and the headroom ("test", or "train" for the in-sample view).

    Returns:
        `BenchStats`.

    Raises:
        ConfigError: the family differs between the train split and `split` (naming the members), and
            the errors of `astar`, `oracle` and `headroom`.
    """
    if members is None:
        _same_family(records, split)
    name, table = astar(records, members=members)
    picks = oracle(records, members=list(table), folds=folds, split=split)
    hr = headroom(records, astar_name=name, oracle_scores=picks, split=split)
    return BenchStats(name, table, picks, hr, split, folds)


# --- power -------------------------------------------------------------------------------------------------------


def _t_power(n: int, effect: float, alpha: float) -> float:
    from scipy import stats

    df = n - 1
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    nc = effect * math.sqrt(n)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def seeds_needed(diffs: Iterable[float], *, delta: float | None = None, alpha: float = 0.05,
                 power: float = 0.8) -> int:
    """Pairs needed for a two-sided paired t-test to detect `delta` with the given power.

    The smallest n >= 2 with ``P(|T| > t(1 - alpha/2, n - 1)) >= power``, where T follows the noncentral
    t distribution with n - 1 degrees of freedom and noncentrality ``|delta| * sqrt(n) / sd`` and sd is
    the sample standard deviation (n - 1 denominator) of `diffs` (exact, `scipy.stats.nct`; the power
    grows with n, so a doubling then bisection search finds it). For per-instance differences the
    answer is seeds per instance; for pooled (instance, seed) pairs it is pairs (divide by the number
    of instances for seeds per instance).

    References (Cohen's d = delta / sd, alpha 0.05 two-sided, power 0.8; G*Power and R's
    ``pwr.t.test(type="paired")``): d = 0.8 -> 15 (14.30), d = 0.5 -> 34 (33.37), d = 0.2 -> 199 (198.15).

    Args:
        diffs: the observed paired differences (at least 2).
        delta: the difference to detect (default: the observed mean).
        alpha: the test's level, in (0, 1).
        power: the wanted power, in (0, 1).

    Returns:
        The number of pairs (2 when the differences do not vary at all).

    Raises:
        ConfigError: fewer than 2 differences, a non-finite one, delta 0 (no sample size detects
            it), alpha or power outside (0, 1), or over 10**8 pairs needed.
    """
    xs = [float(x) for x in diffs]
    if len(xs) < 2:
        raise ConfigError(f"seeds_needed needs at least 2 paired differences to estimate their spread, got {len(xs)}.")
    if not all(math.isfinite(x) for x in xs):
        raise ConfigError("seeds_needed got a non-finite difference.")
    for name, v in (("alpha", alpha), ("power", power)):
        if not 0 < v < 1:
            raise ConfigError(f"{name} must be in (0, 1), got {v}.")
    d = statistics.fmean(xs) if delta is None else float(delta)
    if d == 0 or not math.isfinite(d):
        raise ConfigError(f"cannot size a test to detect a difference of {d}"
                          + (" (the observed mean): pass delta=, the smallest difference worth detecting."
                             if delta is None else "."))
    sd = statistics.stdev(xs)
    n = _pairs_needed(abs(d) / sd if sd else math.inf, alpha, power)
    if n is None:
        raise ConfigError(f"detecting {d:g} with sd {sd:g} needs over {_MAX_PAIRS:.0e} pairs.")
    return n


def _pairs_needed(effect: float, alpha: float, power: float) -> int | None:
    """The smallest n >= 2 whose paired t-test power reaches `power` at ``effect = |delta| / sd``
    (2 for an infinite effect); None above `_MAX_PAIRS`. The power grows with n: doubling, then
    bisection."""
    if math.isinf(effect):
        return 2
    lo, hi = 2, 2
    while _t_power(hi, effect, alpha) < power:
        lo, hi = hi + 1, hi * 2
        if hi > _MAX_PAIRS:
            return None
    while lo < hi:
        mid = (lo + hi) // 2
        if _t_power(mid, effect, alpha) >= power:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _need_text(diffs: Sequence[float], delta: float | None, alpha: float, power: float) -> str:
    """`seeds_needed` for the report: "–" where no sample size applies (under 2 pairs, nothing to
    detect)."""
    d = statistics.fmean(diffs) if delta is None else delta
    if len(diffs) < 2 or d == 0:
        return "–"
    sd = statistics.stdev(diffs)
    n = _pairs_needed(abs(d) / sd if sd else math.inf, alpha, power)
    return f"> {_MAX_PAIRS:.0e}" if n is None else str(n)


# --- runs.csv ----------------------------------------------------------------------------------------------------


def _check_bench(records: Iterable[RunRecord], where: str) -> None:
    for k, r in enumerate(records):
        if r.split not in SPLITS or not r.instance:
            raise ConfigError(f"{where}: run {k} ({r.controller!r}, seed {r.seed}) has split {r.split!r} and instance "
                              f"{r.instance!r}; a benchmark run needs split 'train' or 'test' and an instance name "
                              "(an esper-fn eval runs.csv is not a benchmark's).")


def write_runs(records: Sequence[RunRecord], path: str | Path) -> Path:
    """Write a benchmark's runs.csv (the `RunRecord` columns; a budget of None is an empty cell).

    Raises:
        ConfigError: a record without a split ("train"/"test") or an instance name.
    """
    _check_bench(records, str(path))
    return write_csv(records, path)


def read_runs(path: str | Path) -> list[RunRecord]:
    """Read a benchmark's runs.csv (`write_runs`); an empty ``param_budget`` is None.

    Raises:
        ConfigError: a column that is not a `RunRecord` field, a cell that does not parse, or a run
            without a split or an instance name (e.g. an ``esper-fn eval`` file).
    """
    records = read_csv(path)
    _check_bench(records, str(path))
    return records


# --- the report --------------------------------------------------------------------------------------------------


def _pm(m: float, h: float, *, scale: float = 100.0, signed: bool = False, digits: int = 1) -> str:
    s = f"{scale * m:+.{digits}f}" if signed else f"{scale * m:.{digits}f}"
    return f"{s} ± {scale * h:.{digits}f}" if math.isfinite(h) else f"{s} ± –"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _seed_text(seeds: Sequence[int]) -> str:
    ss = sorted(set(seeds))
    if ss and ss == list(range(ss[0], ss[-1] + 1)):
        return f"{ss[0]}-{ss[-1]}" if len(ss) > 1 else str(ss[0])
    return ",".join(map(str, ss))


def _oracle_records(records: Sequence[RunRecord], picks: Mapping[Cell, OraclePick], split: str,
                    label: str) -> list[RunRecord]:
    """The oracle as runs: on each (instance, seed), the chosen member's run, relabelled."""
    by = {}
    for m in {p.member for p in picks.values()}:
        by[m] = _cells(records, m, split)
    return [replace(by[p.member][c], controller=label) for c, p in picks.items()]


def _family_stats(records: Sequence[RunRecord], members: Sequence[str] | None, folds: int
                  ) -> tuple[str, dict[str, float], dict[str, dict[Cell, OraclePick]], dict[str, str]] | None:
    """a* and the oracle on every split the family ran on, and why the oracle is missing on a split
    where an instance has fewer seeds than `folds` (cross-fitting needs a seed per fold); None
    without a family."""
    names = list(members) if members is not None else family(records)
    if not names:
        return None
    name, table = astar(records, members=members)
    picks, missing = {}, {}
    for split in SPLITS:
        if any(r.split == split and r.controller in table for r in records):
            if members is None:
                _same_family(records, split)
            seeds = _by_instance(_cells(records, name, split))
            few = {i: len(v) for i, v in seeds.items() if len(v) < folds}
            if few:
                missing[split] = (f"no oracle on the {split} split: {', '.join(f'{i} has {n} seed(s)' for i, n in few.items())}, "
                                  f"while {folds}-fold cross-fitting needs at least {folds} seeds per instance (run more seeds).")
                continue
            picks[split] = oracle(records, members=list(table), folds=folds, split=split)
    return name, table, picks, missing


def leaderboard(records: Sequence[RunRecord], *, members: Sequence[str] | None = None, folds: int = 2,
                alpha: float = 0.05, power: float = 0.8, delta: float | None = None,
                title: str = "growthbench leaderboard") -> str:
    """The benchmark's markdown report.

    Sections: how a\\* and the oracle were chosen; per split, one table with a row per comparator (in
    the order they first appear; the family's members are summarised in their own table) plus a\\*
    and the oracle as rows computed from the family: runs, test accuracy (% ± 95% CI over runs),
    mean final parameters and parameters / the host's (``params / params0``), mean germinated /
    fossilized / pruned, the paired difference with a\\* (points ± CI, paired by (instance, seed)) and
    the headroom captured; the per-instance headroom on the test split (a\\*, oracle, oracle - a\\*
    ± CI, the oracle's pick per fold, the seeds a paired t-test needs); the power line; the family's
    members ranked by the a\\* score; the cost (mean wall seconds per episode) per instance and
    comparator. Without a family (no "recipe:" comparator), the comparator tables and the cost only.

    Args:
        records: a benchmark's records (`read_runs`).
        members: the family (default: the "recipe:" comparators).
        folds: the oracle's cross-fitting folds.
        alpha, power: of the seed-count calculation.
        delta: the headroom the seed count is sized for (default: the observed overall headroom).
        title: the report's heading.

    Returns:
        The markdown text.

    Raises:
        ConfigError: no benchmark records, and the errors of `astar`, `oracle` and `headroom`.
    """
    if not records:
        raise ConfigError("leaderboard got no records.")
    for name, v in (("alpha", alpha), ("power", power)):
        if not 0 < v < 1:
            raise ConfigError(f"{name} must be in (0, 1), got {v}.")
    _check_bench(records, "leaderboard")
    fam = _family_stats(records, members, folds)
    member_set = set(fam[1]) if fam else set()
    comparators = [n for n in dict.fromkeys(r.controller for r in records) if n not in member_set]
    lines = [f"# {title}", ""]
    if fam:
        a_name, table, picks, no_oracle = fam
        a_label, o_label = f"a* ({a_name})", f"oracle ({folds}-fold)"
        train = [r for r in records if r.split == "train" and r.controller == a_name]
        lines += [f"**a\\*** = `{a_name}`: of the {len(table)} family members, the best mean validation accuracy "
                  f"on the train split ({len({r.instance for r in train})} instances x "
                  f"{len({r.seed for r in train})} seeds, each instance weighted equally). **oracle**: per "
                  f"instance, the member with the best mean test accuracy on the other folds' seeds ({folds} "
                  "folds, sorted seeds dealt round-robin), scored on this fold's seeds: it is never scored on the "
                  "seeds it was chosen on.", ""]
        lines += [f"**{why[0].upper()}{why[1:]}**" for why in no_oracle.values()] + ([""] if no_oracle else [])
    else:
        a_name, table, picks, a_label, o_label = "", {}, {}, "", ""
        lines += ["No family of fixed policies (`recipe:*`) in these runs: no a\\*, oracle or headroom.", ""]
    lines += ["Accuracy in %, differences in points; ± is the 95% Student-t CI half-width. Differences pair runs "
              "by (instance, seed); a split's means and CIs pool its runs (the CI includes the spread between "
              "instances). params / static: final parameters over the host's at reset (what static ends with)."
              + (" Headroom captured: (C - a\\*) / (oracle - a\\*) over the same pairs." if fam else ""), ""]
    for split in SPLITS:
        rs = [r for r in records if r.split == split]
        if not rs:
            continue
        insts = sorted({r.instance for r in rs})
        lines += [f"## {split} split ({len(insts)} instances, seeds {_seed_text([r.seed for r in rs])})", ""]
        rows_by: dict[str, list[RunRecord]] = {n: [r for r in rs if r.controller == n] for n in comparators}
        rows_by = {n: v for n, v in rows_by.items() if v}
        sp = picks.get(split)
        has_a = bool(fam) and any(r.controller == a_name for r in rs)
        if has_a:
            rows_by[a_label] = [replace(r, controller=a_label) for r in rs if r.controller == a_name]
        if sp:
            rows_by[o_label] = _oracle_records(records, sp, split, o_label)
        aug = list(rs) + [r for n in (a_label, o_label) if n and n in rows_by for r in rows_by[n]]
        body = []
        for n, runs in rows_by.items():
            m, h = mean_ci([r.test_accuracy for r in runs])
            ratio = _mean([r.params / r.params0 if r.params0 else float("nan") for r in runs])
            counts = "/".join(f"{_mean([getattr(r, k) for r in runs]):.1f}" for k in ("germinated", "fossilized",
                                                                                       "pruned"))
            vs, cap = "", ""
            if sp and n != a_label:
                c = captured(aug, n, astar_name=a_label, oracle_scores=sp, split=split)
                vs = _pm(c.gain.mean, c.gain.half, signed=True) + ("" if c.gain.n == len(sp) else f" (n={c.gain.n})")
                cap = f"{c.fraction:.2f}" if math.isfinite(c.fraction) else "–"
            elif has_a and n != a_label:  # no oracle here: the paired difference with a* alone
                mine, theirs = _cells(aug, n, split), _cells(aug, a_label, split)
                common = sorted(set(mine) & set(theirs))
                if common:
                    d = mean_ci([mine[k].test_accuracy - theirs[k].test_accuracy for k in common])
                    vs = _pm(*d, signed=True) + ("" if len(common) == len(theirs) else f" (n={len(common)})")
            body.append([n, str(len(runs)), _pm(m, h), f"{_mean([r.params for r in runs]):.0f}", f"{ratio:.2f}",
                         counts, vs, cap])
        lines += _table(["comparator", "runs", "test acc %", "params", "params / static", "germ/foss/prune",
                         "vs a* (points)", "headroom captured"], body)
        lines.append("")
    test_picks = picks.get("test")
    if fam and test_picks:
        hr = headroom(records, astar_name=a_name, oracle_scores=test_picks)
        a_cells = _cells(records, a_name, "test")
        lines += ["## Headroom on the test split: oracle - a*, paired by seed", ""]
        body = []
        for inst, p in hr.per_instance.items():
            seeds = [s for i, s in test_picks if i == inst]
            am, ah = mean_ci([a_cells[(inst, s)].test_accuracy for s in seeds])
            om, oh = mean_ci([test_picks[(inst, s)].score for s in seeds])
            chosen = {}
            for s in seeds:
                chosen[test_picks[(inst, s)].fold] = test_picks[(inst, s)].member
            fold_text = "; ".join(f"{f}: {m}" for f, m in sorted(chosen.items()))
            need = _need_text([hr.diffs[(inst, s)] for s in seeds], delta, alpha, power)
            body.append([inst, str(p.n), _pm(am, ah), _pm(om, oh), _pm(p.mean, p.half, signed=True), fold_text, need])
        ov = hr.overall
        all_a = mean_ci([a_cells[c].test_accuracy for c in hr.diffs])
        all_o = mean_ci([p.score for p in test_picks.values()])
        body.append(["**all** (pairs)", str(ov.n), _pm(*all_a), _pm(*all_o), _pm(ov.mean, ov.half, signed=True),
                     "", ""])
        lines += _table(["instance", "seeds", "a* %", "oracle %", "oracle - a* (points)", "oracle's pick by fold",
                         "seeds needed"], body)
        lines.append("")
        n_inst = len(hr.per_instance)
        target = ov.mean if delta is None else delta
        need = _need_text(list(hr.diffs.values()), delta, alpha, power)
        if need.isdigit():
            sd = statistics.stdev(hr.diffs.values())
            lines.append(f"Power: to detect a headroom of {100 * target:+.2f} points (sd of a pair {100 * sd:.2f}) "
                         f"with {power:.0%} power in a two-sided paired t-test at alpha = {alpha:g} (exact, "
                         f"noncentral t) takes {need} pairs, {math.ceil(int(need) / n_inst)} seeds on each of the "
                         f"{n_inst} test instances; this run has {ov.n} pairs. Per instance: the last column.")
        else:
            lines.append(f"Power: no seed count applies to a headroom of {100 * target:+.2f} points over {ov.n} pairs "
                         f"({need}: nothing to detect, or too few pairs to estimate the spread).")
        lines.append("")
    if fam:
        lines += [f"## The family, ranked by the a* score (mean validation accuracy, train split)", ""]
        body = []
        for rank, (m, s) in enumerate(table.items(), start=1):
            cols = [str(rank), f"`{m}`", f"{100 * s:.1f}"]
            for split in SPLITS:
                rs = [r.test_accuracy for r in records if r.controller == m and r.split == split]
                cols.append(_pm(*mean_ci(rs)) if rs else "")
            cols.append(f"{_mean([r.params for r in records if r.controller == m]):.0f}")
            body.append(cols)
        lines += _table(["rank", "member", "train val acc %", "train test acc %", "test test acc %", "params"], body)
        lines.append("")
    lines += ["## Cost: mean wall seconds per episode", ""]
    cols = comparators + (["family (mean per member)"] if member_set else [])
    body = []
    for split in SPLITS:
        for inst in sorted({r.instance for r in records if r.split == split}):
            row = [inst, split]
            for n in cols:
                if n == "family (mean per member)":
                    secs = [r.seconds for r in records if r.controller in member_set and r.instance == inst
                            and r.split == split]
                else:
                    secs = [r.seconds for r in records if r.controller == n and r.instance == inst and r.split == split]
                row.append(f"{_mean(secs):.1f}" if secs else "")
            body.append(row)
    lines += _table(["instance", "split", *cols], body)
    return "\n".join(lines) + "\n"


# --- the figures -------------------------------------------------------------------------------------------------


def _file_name(instance: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", instance)


def plot_bench(records: Sequence[RunRecord], out_dir: str | Path, *, members: Sequence[str] | None = None,
               folds: int = 2) -> list[Path]:
    """The benchmark's PNGs (matplotlib's Agg canvas; pyplot's global state is not touched).

    * ``acc_vs_params_<instance>.png`` per instance: test accuracy against final parameters, one point
      per run; one colour per comparator with its mean ± 95% CI; the family's members in grey; a\\* (black)
      and the oracle (red: the chosen member's run on each seed) highlighted with their means ± CI.
    * ``headroom.png`` (when the family ran on the test split): oracle - a\\* per test instance and over all
      pairs, in points, with 95% CI bars.

    Args:
        records: a benchmark's records.
        out_dir: created if missing.
        members, folds: as `leaderboard`.

    Returns:
        The paths written, the per-instance plots first (train instances, then test, by name).

    Raises:
        ConfigError: no records, two instances whose file names collide, and the errors of `astar` and
            `oracle`.
    """
    from matplotlib.figure import Figure

    if not records:
        raise ConfigError("plot_bench got no records.")
    _check_bench(records, "plot_bench")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fam = _family_stats(records, members, folds)
    a_name, table, picks, _ = fam if fam else ("", {}, {}, {})
    comparators = [n for n in dict.fromkeys(r.controller for r in records) if n not in table]
    paths: list[Path] = []
    seen: dict[str, str] = {}

    def mean_bar(ax, runs, label: str | None = None, **kw) -> None:
        m, h = mean_ci([100 * r.test_accuracy for r in runs])
        ax.errorbar([_mean([r.params for r in runs])], [m], yerr=[0 if math.isnan(h) else h], capsize=4,
                    label=None if label is None else f"{label} ({m:.1f}%)", **kw)

    for split in SPLITS:
        for inst in sorted({r.instance for r in records if r.split == split}):
            fname = f"acc_vs_params_{_file_name(inst)}.png"
            if fname in seen:
                raise ConfigError(f"instances {seen[fname]!r} and {inst!r} would both be plotted to {fname}; "
                                  "rename one.")
            seen[fname] = inst
            rs = [r for r in records if r.split == split and r.instance == inst]
            fig = Figure(figsize=(7, 4.5))
            ax = fig.subplots()
            fam_runs = [r for r in rs if r.controller in table]
            if fam_runs:
                ax.scatter([r.params for r in fam_runs], [100 * r.test_accuracy for r in fam_runs], s=10,
                           color="0.75", label=f"family ({len(table)} members)")
                for m in table:
                    mr = [r for r in fam_runs if r.controller == m]
                    if mr:
                        mean_bar(ax, mr, fmt="o", color="0.6", markersize=4)
            for k, n in enumerate(comparators):
                cr = [r for r in rs if r.controller == n]
                if not cr:
                    continue
                color = f"C{k % 10}"
                ax.scatter([r.params for r in cr], [100 * r.test_accuracy for r in cr], s=18, alpha=0.5, color=color)
                mean_bar(ax, cr, n, fmt="D", color=color, markersize=8)
            if fam_runs:
                ar = [r for r in fam_runs if r.controller == a_name]
                ax.scatter([r.params for r in ar], [100 * r.test_accuracy for r in ar], s=22, color="black")
                mean_bar(ax, ar, f"a* = {a_name}", fmt="*", color="black", markersize=14)
                sp = picks.get(split, {})
                orr = _oracle_records(records, {c: p for c, p in sp.items() if c[0] == inst}, split, "oracle")
                if orr:
                    ax.scatter([r.params for r in orr], [100 * r.test_accuracy for r in orr], s=22, color="red",
                               marker="x")
                    mean_bar(ax, orr, f"oracle ({folds}-fold)", fmt="*", color="red", markersize=14)
            ax.set_xlabel("final parameters")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{inst} ({split}): test accuracy vs parameters")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / fname
            fig.savefig(path, dpi=110)
            paths.append(path)
    if fam and picks.get("test"):
        hr = headroom(records, astar_name=a_name, oracle_scores=picks["test"])
        names = [*hr.per_instance, "all (pairs)"]
        vals = [*hr.per_instance.values(), hr.overall]
        fig = Figure(figsize=(max(5.0, 0.9 * len(names) + 2), 4))
        ax = fig.subplots()
        ax.bar(range(len(names)), [100 * p.mean for p in vals],
               yerr=[0 if math.isnan(p.half) else 100 * p.half for p in vals], capsize=4,
               color=["C0"] * (len(names) - 1) + ["C3"])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("oracle - a* (points)")
        ax.set_title(f"headroom on the test split, 95% CI\n(a* = {a_name}, oracle {folds}-fold)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out / "headroom.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths
