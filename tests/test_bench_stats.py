"""The growth benchmark's statistics on synthetic outcomes where the answer is known: a*, the
cross-fitted oracle, the headroom and its CIs, the headroom captured, the seed count, the report, the
figures and runs.csv."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from esper_fn._errors import ConfigError
from esper_fn.policies import (
    RunRecord,
    astar,
    bench_stats,
    captured,
    headroom,
    leaderboard,
    oracle,
    plot_bench,
    read_runs,
    seeds_needed,
    write_runs,
)
from esper_fn.policies._bench_stats import OraclePick
from esper_fn.policies._eval import mean_ci, read_csv, write_csv

SEEDS = [1000, 1001, 1002, 1003, 1004, 1005]
TRAIN = ("tr1", "tr2")
TEST = ("te1", "te2", "te3")
# The true mean accuracy (test and validation alike) of each comparator on each instance. A is the best
# fixed policy on the train split; on the test split B wins te1 by 5 points and C wins te2 by 4; A wins te3.
# "heuristic" plays B on te1 and A elsewhere, so it captures the te1 headroom only.
MEANS = {
    "recipe:A": {"tr1": 0.80, "tr2": 0.80, "te1": 0.70, "te2": 0.70, "te3": 0.80},
    "recipe:B": {"tr1": 0.75, "tr2": 0.76, "te1": 0.75, "te2": 0.69, "te3": 0.75},
    "recipe:C": {"tr1": 0.74, "tr2": 0.74, "te1": 0.70, "te2": 0.74, "te3": 0.75},
    "static": {"tr1": 0.65, "tr2": 0.65, "te1": 0.65, "te2": 0.65, "te3": 0.65},
    "heuristic": {"tr1": 0.79, "tr2": 0.79, "te1": 0.75, "te2": 0.70, "te3": 0.80},
}
PARAMS = {"recipe:A": 900, "recipe:B": 1000, "recipe:C": 950, "static": 826, "heuristic": 960}
SECONDS = {"static": 1.0, "heuristic": 2.0}
NOISE = 0.004  # a run's own noise (sd); each (instance, seed) also shares a luck term of sd 0.02 across comparators


def rec(controller: str, instance: str, seed: int, acc: float, *, val: float | None = None, params: int = 900,
        split: str | None = None, seconds: float = 1.5, **kw) -> RunRecord:
    split = split or ("train" if instance.startswith("tr") else "test")
    return RunRecord(controller=controller, seed=seed, context=f"task/{instance}", test_accuracy=acc,
                     val_accuracy=acc if val is None else val, params=params, params0=826, compute_gflops=0.5,
                     seconds=seconds, instance=instance, split=split, param_budget=1073, **kw)


def synthetic(seed: int = 0) -> list[RunRecord]:
    """The `MEANS` design with 6 seeds, noise from a fixed numpy generator, seeds listed unsorted."""
    rng = np.random.default_rng(seed)
    luck = {(i, s): rng.normal(0, 0.02) for i in (*TRAIN, *TEST) for s in SEEDS}
    out = []
    for name, per in MEANS.items():
        for inst, mu in per.items():
            for s in SEEDS[::-1]:
                t, v = mu + luck[(inst, s)] + rng.normal(0, NOISE, size=2)
                out.append(rec(name, inst, s, float(t), val=float(v), params=PARAMS[name],
                               seconds=SECONDS.get(name, 1.5), germinated=int(name != "static")))
    return out


def grid(values: dict[str, dict[str, list[float]]], seeds=SEEDS, params=None) -> list[RunRecord]:
    """Records with the given accuracies: member -> instance -> one value per seed."""
    return [rec(m, inst, s, v, params=(params or {}).get(m, 900))
            for m, per in values.items() for inst, vs in per.items() for s, v in zip(seeds, vs, strict=True)]


@pytest.fixture(scope="module")
def records() -> list[RunRecord]:
    return synthetic()


# --- a* ---------------------------------------------------------------------------------------------------------


def test_astar_is_the_best_member_on_the_train_split(records):
    name, table = astar(records)
    assert name == "recipe:A"
    assert list(table) == ["recipe:A", "recipe:B", "recipe:C"]  # best first; "static"/"heuristic" are no members
    # the score by hand: mean over seeds per instance, then over instances, of the validation accuracy
    for m in table:
        per = [np.mean([r.val_accuracy for r in records if r.controller == m and r.instance == i]) for i in TRAIN]
        assert table[m] == pytest.approx(np.mean(per), abs=1e-12)
    # key= chooses what is maximised; members= restricts the family
    assert astar(records, key="params")[0] == "recipe:B"
    assert astar(records, members=["recipe:B", "recipe:C"])[0] == "recipe:B"


def test_astar_weighs_each_instance_equally():
    # tr1 has 6 seeds, tr2 only 2. Pooled over runs X wins (0.80 vs 0.7875); per instance Y does (0.775 vs 0.70).
    recs = grid({"recipe:X": {"tr1": [0.9] * 6}, "recipe:Y": {"tr1": [0.8] * 6}}) + \
        grid({"recipe:X": {"tr2": [0.5] * 2}, "recipe:Y": {"tr2": [0.75] * 2}}, seeds=SEEDS[:2])
    name, table = astar(recs)
    assert name == "recipe:Y"
    assert table == pytest.approx({"recipe:Y": 0.775, "recipe:X": 0.7})


def test_astar_breaks_ties_by_fewer_params_then_by_name():
    same = {"tr1": [0.7, 0.8, 0.9]}
    recs = grid({"recipe:b": same, "recipe:a": same, "recipe:c": same}, seeds=SEEDS[:3],
                params={"recipe:a": 950, "recipe:b": 900, "recipe:c": 900})
    name, table = astar(recs)
    assert name == "recipe:b" and list(table) == ["recipe:b", "recipe:c", "recipe:a"]
    # scores equal up to rounding (the same values summed in another order) are a tie too
    recs = grid({"recipe:z": {"tr1": [0.1, 0.2, 0.3]}, "recipe:y": {"tr1": [0.3, 0.2, 0.1]}}, seeds=SEEDS[:3],
                params={"recipe:z": 900, "recipe:y": 800})
    name, table = astar(recs)
    assert table["recipe:z"] > table["recipe:y"]  # 0.20000000000000004 against 0.19999999999999998
    assert name == "recipe:y"
    # and a real difference beats fewer params
    recs = grid({"recipe:z": {"tr1": [0.1, 0.2, 0.3]}, "recipe:y": {"tr1": [0.3, 0.1, 0.21]}}, seeds=SEEDS[:3],
                params={"recipe:z": 800, "recipe:y": 900})
    assert astar(recs)[0] == "recipe:y"


def _poison_test_split(records: list[RunRecord]) -> list[RunRecord]:
    """B perfect on the test split, a new test-only member D even better, a test run of C dropped."""
    out = [replace(r, test_accuracy=1.0, val_accuracy=1.0) if r.split == "test" and r.controller == "recipe:B"
           else r for r in records]
    out = [r for r in out if not (r.split == "test" and r.controller == "recipe:C" and r.seed == SEEDS[0])]
    out += [rec("recipe:D", inst, s, 1.0, val=1.0) for inst in TEST for s in SEEDS]
    return out


def test_astar_never_reads_the_test_split(records):
    poisoned = _poison_test_split(records)
    assert astar(poisoned) == astar(records)
    # the poison is strong: had the test split been read, B would win
    as_train = [replace(r, split="train") for r in poisoned if r.controller != "recipe:D"]
    as_train = [r for r in as_train if not (r.controller == "recipe:C" and r.instance in TEST)]
    assert astar(as_train, members=["recipe:A", "recipe:B"])[0] == "recipe:B"


@given(st.lists(st.tuples(st.integers(0, 10_000), st.floats(0, 1), st.floats(0, 1), st.integers(1, 10**6)),
                min_size=1, max_size=30),
       st.sets(st.integers(0, 10_000), max_size=20))
def test_astar_is_invariant_to_any_change_of_the_test_split(records, changes, drops):
    test_idx = [k for k, r in enumerate(records) if r.split == "test"]
    new = list(records)
    for which, acc, val, params in changes:
        k = test_idx[which % len(test_idx)]
        new[k] = replace(new[k], test_accuracy=acc, val_accuracy=val, params=params)
    dropped = {test_idx[d % len(test_idx)] for d in drops}
    new = [r for k, r in enumerate(new) if k not in dropped]
    new += [rec(f"recipe:new{k}", "te1", 7, acc, val=val) for k, (_, acc, val, _) in enumerate(changes[:3])]
    assert astar(new) == astar(records)


def test_astar_errors_say_what_is_wrong(records):
    tests_only = [r for r in records if r.split == "test"]
    with pytest.raises(ConfigError, match="no train-split records of the family"):
        astar(tests_only)
    gap = [r for r in records if not (r.controller == "recipe:B" and r.instance == "tr2" and r.seed == 1003)]
    with pytest.raises(ConfigError, match=r"'recipe:B' is missing 1 .*tr2/seed 1003"):
        astar(gap)
    with pytest.raises(ConfigError, match=r"two train-split runs on instance 'tr1', seed 1000"):
        astar(records + [rec("recipe:A", "tr1", 1000, 0.5)])
    with pytest.raises(ConfigError, match="not a numeric RunRecord field"):
        astar(records, key="decisions")
    nan = [replace(r, val_accuracy=float("nan")) if (r.controller, r.instance, r.seed) == ("recipe:C", "tr2", 1001)
           else r for r in records]
    with pytest.raises(ConfigError, match=r"'recipe:C' on instance 'tr2', seed 1001 \(train\) has val_accuracy = nan"):
        astar(nan)
    with pytest.raises(ConfigError, match="members= is empty"):
        astar(records, members=[])
    with pytest.raises(ConfigError, match=r"'recipe:nope' is missing 12 of the 12"):
        astar(records, members=["recipe:A", "recipe:nope"])


# --- the oracle -------------------------------------------------------------------------------------------------


def test_oracle_picks_the_best_member_per_instance_on_every_fold(records):
    picks = oracle(records)
    assert list(picks) == [(i, s) for i in TEST for s in SEEDS]  # sorted, though the records list seeds backwards
    best = {"te1": "recipe:B", "te2": "recipe:C", "te3": "recipe:A"}
    acc = {(r.controller, r.instance, r.seed): r.test_accuracy for r in records}
    for (inst, seed), p in picks.items():
        assert p.member == best[inst]
        assert p.fold == SEEDS.index(seed) % 2  # sorted seeds dealt round-robin
        assert p.score == acc[(p.member, inst, seed)]
    three = oracle(records, folds=3)
    assert {p.fold for p in three.values()} == {0, 1, 2} and three[("te1", 1005)].fold == 2
    assert all(p.member == best[i] for (i, _), p in three.items())
    # split="train" (the in-sample view of the leaderboard) reads the train split
    assert {i for i, _ in oracle(records, split="train")} == set(TRAIN)


def test_a_member_that_wins_only_on_the_scoring_fold_is_not_picked():
    # B beats A by luck on the fold-0 seeds (1000, 1002, 1004) and loses on the fold-1 seeds.
    luck = {"tr1": [0.5] * 6}
    recs = grid({"recipe:A": {**luck, "te": [0.70] * 6},
                 "recipe:B": {**luck, "te": [0.80, 0.60, 0.80, 0.60, 0.80, 0.60]}})
    picks = oracle(recs)
    # fold 0 is scored by the member chosen on fold 1 (A: 0.70 > 0.60), fold 1 by the one chosen on fold 0 (B)
    assert [picks[("te", s)].member for s in SEEDS] == ["recipe:A", "recipe:B"] * 3
    assert [picks[("te", s)].score for s in SEEDS] == [0.70, 0.60] * 3
    # so the honest oracle pays for the luck: below a* here, where an in-sample oracle would claim +5 points
    hr = headroom(recs, astar_name="recipe:A", oracle_scores=picks)
    assert hr.per_instance["te"].mean == pytest.approx(-0.05)


@given(st.integers(0, 2**32 - 1), st.integers(2, 3), st.integers(4, 7))
def test_a_fold_s_pick_depends_only_on_the_other_folds(seed, folds, n_seeds):
    rng = np.random.default_rng(seed)
    members = ["recipe:a", "recipe:b", "recipe:c"]
    seeds = list(range(20, 20 + n_seeds))
    vals = {m: rng.uniform(0.5, 0.9, n_seeds).round(3) for m in members}
    recs = grid({m: {"te": list(v)} for m, v in vals.items()}, seeds=seeds)
    picks = oracle(recs, folds=folds)
    for f in range(folds):
        fit = [k for k in range(n_seeds) if k % folds != f]
        means = {m: vals[m][fit].mean() for m in members}
        top = max(means.values())
        expect = min(m for m in members if means[m] >= top - 1e-12)  # params equal: the name breaks ties
        assert all(picks[("te", seeds[k])].member == expect for k in range(f, n_seeds, folds))
        # rewrite fold f's outcomes at will: its pick cannot move
        moved = [replace(r, test_accuracy=float(rng.uniform())) if (r.seed - 20) % folds == f else r for r in recs]
        again = oracle(moved, folds=folds)
        assert all(again[("te", seeds[k])].member == expect for k in range(f, n_seeds, folds))


def test_oracle_errors(records):
    with pytest.raises(ConfigError, match="folds must be an int >= 2"):
        oracle(records, folds=1)
    few = grid({"recipe:A": {"te": [0.5, 0.6]}, "recipe:B": {"te": [0.5, 0.7]}}, seeds=SEEDS[:2])
    with pytest.raises(ConfigError, match=r"instance 'te' has 2 test-split seeds; 3-fold"):
        oracle(few, folds=3)
    gap = [r for r in records if not (r.controller == "recipe:C" and r.instance == "te3" and r.seed == 1001)]
    with pytest.raises(ConfigError, match=r"'recipe:C' is missing 1 of the 18 test-split .*te3/seed 1001"):
        oracle(gap)
    with pytest.raises(ConfigError, match="split must be one of"):
        oracle(records, split="val")


# --- the headroom and its CIs -----------------------------------------------------------------------------------


def test_headroom_recovers_the_known_margins(records):
    b = bench_stats(records)
    assert b.astar == "recipe:A" and b.split == "test" and b.folds == 2
    hr = b.headroom
    assert hr.per_instance["te1"].mean == pytest.approx(0.05, abs=0.01)
    assert hr.per_instance["te2"].mean == pytest.approx(0.04, abs=0.01)
    assert hr.per_instance["te3"] == (0.0, 0.0, 6)  # the oracle plays a* there: every pair differs by 0
    assert all(p.n == 6 and p.half < 0.01 for p in hr.per_instance.values())
    assert hr.overall.n == 18 and hr.overall.mean == pytest.approx(0.03, abs=0.006)
    # the same seeds everywhere: the mean over pairs is the mean of the instances' means
    assert hr.overall.mean == pytest.approx(np.mean([p.mean for p in hr.per_instance.values()]), abs=1e-12)
    acc = {(r.controller, r.instance, r.seed): r.test_accuracy for r in records}
    assert hr.diffs[("te1", 1003)] == acc[("recipe:B", "te1", 1003)] - acc[("recipe:A", "te1", 1003)]


def test_ci_half_widths_match_a_hand_computation():
    # Two test instances, three seeds; B beats A on every seed, so the oracle plays B on both folds.
    diffs = {"i1": [0.01, 0.03, 0.05], "i2": [0.02, 0.04, 0.09]}
    recs = grid({"recipe:A": {"tr": [0.9] * 3, "i1": [0.5] * 3, "i2": [0.6] * 3},
                 "recipe:B": {"tr": [0.8] * 3, "i1": [0.5 + d for d in diffs["i1"]],
                              "i2": [0.6 + d for d in diffs["i2"]]}}, seeds=SEEDS[:3])
    recs = [replace(r, split="train") if r.instance == "tr" else r for r in recs]
    hr = bench_stats(recs).headroom
    # i1 by hand: mean 0.03, sd 0.02, t(0.975, 2) = 4.302653
    assert hr.per_instance["i1"].mean == pytest.approx(0.03)
    assert hr.per_instance["i1"].half == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-6)
    # and with scipy's own t-interval, per instance and over the 6 pooled pairs (t with 5 degrees of freedom)
    for inst, xs in [*diffs.items(), ("all", diffs["i1"] + diffs["i2"])]:
        p = hr.overall if inst == "all" else hr.per_instance[inst]
        lo, hi = stats.ttest_1samp(xs, 0.0).confidence_interval(0.95)
        assert p.n == len(xs) and p.mean == pytest.approx(np.mean(xs), abs=1e-12)
        assert p.half == pytest.approx((hi - lo) / 2, rel=1e-9)
    assert hr.overall.half == pytest.approx(stats.t.ppf(0.975, 5) * np.std(diffs["i1"] + diffs["i2"], ddof=1)
                                            / math.sqrt(6), rel=1e-9)


def test_headroom_errors(records):
    picks = oracle(records)
    with pytest.raises(ConfigError, match="oracle_scores is empty"):
        headroom(records, astar_name="recipe:A", oracle_scores={})
    with pytest.raises(ConfigError, match="'static' has no test-split run on 1 .*compute the oracle on split='test'"):
        headroom(records, astar_name="static", oracle_scores={**picks, ("te9", 1): OraclePick("recipe:A", 0.5, 0)})
    changed = [replace(r, controller="recipe:E") if r.controller == "recipe:C" and r.split == "test" else r
               for r in records]
    with pytest.raises(ConfigError, match=r"only on train \['recipe:C'\], only on test \['recipe:E'\]"):
        bench_stats(changed)


def test_headroom_captured(records):
    b = bench_stats(records)
    kw = dict(astar_name=b.astar, oracle_scores=b.oracle)
    h = captured(records, "heuristic", **kw)
    # heuristic gains the 5 points of te1 and nothing elsewhere: (0.05 / 3) / (0.09 / 3)
    assert h.fraction == pytest.approx(0.05 / 0.09, abs=0.12)
    assert h.gain.n == 18 and h.gain.mean == pytest.approx(0.05 / 3, abs=0.004)
    assert h.per_instance["te1"][0] == pytest.approx(1.0, abs=0.25)
    assert h.per_instance["te2"][0] == pytest.approx(0.0, abs=0.25)
    assert math.isnan(h.per_instance["te3"][0])  # no headroom on te3: the share is undefined
    assert captured(records, "static", **kw).fraction < -1  # 15 points below a*, 3 of headroom
    # a* itself captures exactly 0, and the oracle's own runs exactly 1
    assert captured(records, "recipe:A", **kw).fraction == 0.0
    as_runs = [replace(next(r for r in records if r.controller == p.member and (r.instance, r.seed) == c),
                       controller="played-oracle") for c, p in b.oracle.items()]
    assert captured(records + as_runs, "played-oracle", **kw).fraction == pytest.approx(1.0, abs=1e-12)
    # a comparator with fewer seeds is compared on the pairs it has
    part = [r for r in records if not (r.controller == "heuristic" and r.seed == 1000)]
    assert captured(part, "heuristic", **kw).gain.n == 15
    with pytest.raises(ConfigError, match="'nobody' has no test-split run"):
        captured(records, "nobody", **kw)


# --- seeds needed -----------------------------------------------------------------------------------------------


def _with_effect(d: float, n: int = 20) -> np.ndarray:
    """n differences with mean exactly d and standard deviation exactly 1 (Cohen's d = d)."""
    z = np.random.default_rng(1).normal(size=n)
    return (z - z.mean()) / z.std(ddof=1) + d


def test_seeds_needed_matches_textbook_values():
    # Paired t-test, alpha 0.05 two-sided, power 0.8; G*Power and R's pwr.t.test(type="paired") give
    # n = 14.30, 33.37 and 198.15 for Cohen's d = 0.8, 0.5 and 0.2: 15, 34 and 199 pairs.
    assert seeds_needed(_with_effect(0.8)) == 15
    assert seeds_needed(_with_effect(0.5)) == 34
    assert seeds_needed(_with_effect(0.2)) == 199
    assert seeds_needed(_with_effect(0.5), delta=0.2) == 199  # delta= replaces the observed mean
    assert seeds_needed(_with_effect(-0.5)) == 34  # two-sided: the sign does not matter
    assert seeds_needed(3 * _with_effect(0.5)) == 34  # only delta / sd matters
    # 90% power takes more: pwr gives 43.98 for d = 0.5
    assert seeds_needed(_with_effect(0.5), power=0.9) == 44


def test_seeds_needed_grows_as_delta_shrinks_and_reaches_its_power():
    xs = _with_effect(0.5)
    ns = [seeds_needed(xs, delta=d) for d in (2.0, 1.0, 0.5, 0.25, 0.1)]
    assert ns == sorted(ns) and len(set(ns)) == len(ns) and ns[0] >= 2
    # the normal approximation is a lower bound of the exact t-test's n
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert all(n >= (z / d) ** 2 for n, d in zip(ns, (2.0, 1.0, 0.5, 0.25, 0.1)))
    # simulated: paired t-tests on 34 pairs of a true d = 0.5 reject about 80% of the time
    sims = np.random.default_rng(2).normal(0.5, 1.0, size=(4000, 34))
    rejected = (stats.ttest_1samp(sims, 0.0, axis=1).pvalue < 0.05).mean()
    assert 0.78 <= rejected <= 0.83
    assert seeds_needed([0.3, 0.3, 0.3]) == 2  # no spread: the smallest t-test detects it


def test_seeds_needed_errors():
    with pytest.raises(ConfigError, match="at least 2 paired differences"):
        seeds_needed([0.1])
    with pytest.raises(ConfigError, match="difference of 0.0 .*pass delta="):
        seeds_needed([0.1, -0.1])
    with pytest.raises(ConfigError, match="alpha must be in"):
        seeds_needed([0.1, 0.2], alpha=0)
    with pytest.raises(ConfigError, match="power must be in"):
        seeds_needed([0.1, 0.2], power=1.0)
    with pytest.raises(ConfigError, match="non-finite"):
        seeds_needed([0.1, float("inf")])
    with pytest.raises(ConfigError, match="over 1e\\+08 pairs"):
        seeds_needed(_with_effect(0.5), delta=1e-5)


# --- the report, the figures, runs.csv --------------------------------------------------------------------------


def _row(report: str, first: str) -> list[str]:
    rows = [line for line in report.splitlines() if line.startswith(f"| {first} |")]
    assert rows, f"no row {first!r}"
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_leaderboard(records):
    report = leaderboard(records)
    b = bench_stats(records)
    assert "**a\\*** = `recipe:A`" in report
    assert "## train split (2 instances, seeds 1000-1005)" in report
    assert "## test split (3 instances, seeds 1000-1005)" in report
    test_part = report.split("## test split")[1].split("## Headroom")[0]
    rows = {line.split("|")[1].strip() for line in test_part.splitlines() if line.startswith("| ")}
    assert rows == {"comparator", "static", "heuristic", "a* (recipe:A)", "oracle (2-fold)"}  # members: own table
    static = _row(test_part, "static")
    m, h = mean_ci([r.test_accuracy for r in records if r.controller == "static" and r.split == "test"])
    assert static[1] == "18" and static[2] == f"{100 * m:.1f} ± {100 * h:.1f}"
    assert static[3] == "826" and static[4] == "1.00" and static[5] == "0.0/0.0/0.0"
    heur = _row(test_part, "heuristic")
    c = captured(records, "heuristic", astar_name="recipe:A", oracle_scores=b.oracle)
    assert heur[6] == f"{100 * c.gain.mean:+.1f} ± {100 * c.gain.half:.1f}" and heur[7] == f"{c.fraction:.2f}"
    assert heur[5] == "1.0/0.0/0.0" and heur[4] == f"{960 / 826:.2f}"
    assert _row(test_part, "oracle (2-fold)")[7] == "1.00"
    # the headroom table: the known margins, the oracle's picks, a seed count
    hr = b.headroom
    for inst, member in (("te1", "recipe:B"), ("te2", "recipe:C"), ("te3", "recipe:A")):
        row = _row(report, inst)
        p = hr.per_instance[inst]
        assert row[1] == "6" and row[4] == f"{100 * p.mean:+.1f} ± {100 * p.half:.1f}"
        assert row[5] == f"0: {member}; 1: {member}"
    assert _row(report, "te1")[4].startswith(("+4.", "+5."))
    assert _row(report, "te1")[6] == str(seeds_needed([hr.diffs[("te1", s)] for s in SEEDS]))
    assert _row(report, "te3")[6] == "–"  # nothing to detect
    assert _row(report, "**all** (pairs)")[4] == f"{100 * hr.overall.mean:+.1f} ± {100 * hr.overall.half:.1f}"
    need = seeds_needed(list(hr.diffs.values()))
    assert f"takes {need} pairs, {math.ceil(need / 3)} seeds on each of the 3 test instances" in report
    # the family ranked; the cost per instance
    assert _row(report, "1")[1] == "`recipe:A`" and _row(report, "3")[1] == "`recipe:C`"
    assert _row(report, "te2")[:2] == ["te2", "6"] and _row(report, "tr1")[1:] == ["train", "1.0", "2.0", "1.5"]
    assert "| instance | split | static | heuristic | family (mean per member) |" in report
    sized = leaderboard(records, delta=0.03)  # sized for a 3-point headroom instead of the observed one
    assert f"a headroom of +3.00 points (sd of a pair" in sized
    assert f"takes {seeds_needed(list(hr.diffs.values()), delta=0.03)} pairs" in sized


def test_leaderboard_with_one_seed_leaves_the_oracle_out_and_keeps_a_star(records, tmp_path):
    one = [r for r in records if r.seed == SEEDS[0]]
    report = leaderboard(one)
    assert "No oracle on the train split: tr1 has 1 seed(s), tr2 has 1 seed(s)" in report
    assert "No oracle on the test split" in report and "oracle (2-fold)" not in report and "## Headroom" not in report
    test_part = report.split("## test split")[1]
    heur = [r for r in one if r.controller == "heuristic" and r.split == "test"]
    a = {r.instance: r.test_accuracy for r in one if r.controller == "recipe:A" and r.split == "test"}
    m, h = mean_ci([r.test_accuracy - a[r.instance] for r in heur])
    assert _row(test_part, "heuristic")[6] == f"{100 * m:+.1f} ± {100 * h:.1f}"  # still paired with a*
    assert _row(test_part, "a* (recipe:A)")[1] == "3" and _row(test_part, "heuristic")[7] == ""
    assert [p.name for p in plot_bench(one, tmp_path)][-1] != "headroom.png"  # the figures without the oracle
    with pytest.raises(ConfigError, match="cross-fitting needs at least 2"):
        oracle(one, split="test")  # the oracle itself still refuses


def test_leaderboard_without_a_family_and_on_bad_input(records):
    plain = [r for r in records if not r.controller.startswith("recipe:")]
    report = leaderboard(plain)
    assert "No family of fixed policies" in report and "Headroom" not in report and "oracle (" not in report
    assert _row(report, "static")[6] == "" and _row(report, "te1")[1:] == ["test", "1.0", "2.0"]
    with pytest.raises(ConfigError, match="no records"):
        leaderboard([])
    with pytest.raises(ConfigError, match="split '' and instance ''"):
        leaderboard([replace(records[0], split="", instance="")])
    with pytest.raises(ConfigError, match="alpha must be in"):
        leaderboard(records, alpha=2)


def test_plot_bench_writes_non_trivial_pngs(records, tmp_path):
    import matplotlib.image as mpimg

    paths = plot_bench(records, tmp_path / "figs")
    assert [p.name for p in paths] == [f"acc_vs_params_{i}.png" for i in (*TRAIN, *TEST)] + ["headroom.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        img = mpimg.imread(p)
        assert img.shape[0] > 300 and img.shape[1] > 500 and img[..., :3].std() > 0.05  # drawn, not blank
    plain = [r for r in records if not r.controller.startswith("recipe:")]
    assert [p.name for p in plot_bench(plain, tmp_path / "plain")][-1] == "acc_vs_params_te3.png"


def test_runs_csv_round_trip(records, tmp_path):
    recs = records[:7] + [replace(records[7], param_budget=None, decisions="0:GERMINATE:input:conv1d_k3")]
    path = write_runs(recs, tmp_path / "runs.csv")
    back = read_runs(path)
    assert back == recs and back[-1].param_budget is None and back[0].param_budget == 1073
    assert path.read_text().splitlines()[-1].endswith(",")  # None: an empty cell
    assert read_runs(write_runs([], tmp_path / "empty.csv")) == []


def test_runs_csv_reads_old_files_and_names_bad_ones(records, tmp_path):
    old = tmp_path / "old.csv"  # an esper-fn eval runs.csv written before the benchmark's columns existed
    cols = ["controller", "seed", "context", "test_accuracy", "val_accuracy", "params", "params0", "compute_gflops",
            "germinated", "fossilized", "pruned", "rollbacks", "epochs", "decisions", "seconds"]
    old.write_text(",".join(cols) + "\nstatic,5,mnist1d/mlp,0.5,0.6,826,826,0.1,0,0,0,0,4,,1.5\n")
    (r,) = read_csv(old)
    assert (r.controller, r.seed, r.test_accuracy, r.instance, r.split, r.param_budget) == \
        ("static", 5, 0.5, "", "", None)
    with pytest.raises(ConfigError, match="split '' and instance ''"):
        read_runs(old)
    bad = tmp_path / "bad.csv"
    bad.write_text(",".join(cols) + ",colour\n")
    with pytest.raises(ConfigError, match=r"columns \['colour'\] are not RunRecord fields"):
        read_runs(bad)
    path = write_csv(records[:2], tmp_path / "cell.csv")
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace(",1073", ",many")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"line 3: column 'param_budget' holds 'many'"):
        read_runs(path)
    with pytest.raises(ConfigError, match="run 0 .* has split '' and instance 'tr1'"):
        write_runs([replace(records[0], split="")], tmp_path / "no.csv")


def test_every_function_leaves_the_records_untouched(records, tmp_path):
    before = copy.deepcopy(records)
    b = bench_stats(records)
    astar(records)
    oracle(records, folds=3)
    captured(records, "heuristic", astar_name=b.astar, oracle_scores=b.oracle)
    leaderboard(records)
    plot_bench(records, tmp_path)
    assert records == before
