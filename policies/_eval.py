"""Controller evaluation on held-out seeds: final test accuracy, parameters and training compute,
with Student-t confidence intervals and paired differences, as CSV and a PNG.

Every controller plays the same run seeds of the same env, so each seed has the same host init,
data order and seed init for every controller (the env's run-seed streams guarantee it) and
differences are paired by seed. The test split is evaluated once per run, on the final network;
it never reaches a controller.

The env is never imported: `evaluate_controllers` takes a factory ``make_env(num_envs)`` and
controller factories ``make_policy(env) -> policy``.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type, step_mdp

from esper_fn._errors import ConfigError
from esper_fn.training import evaluate, flops_per_sample

from esper_fn import Op
from esper_fn.actions import ActionSpace

from ._baselines import RandomPolicy

__all__ = ["RunRecord", "evaluate_controllers", "paired", "run_episodes", "summarize", "tune_baseline",
           "write_csv", "plot_runs"]


@dataclass
class RunRecord:
    """One controller on one run seed.

    Attributes:
        controller: its name.
        seed: the run seed.
        context: ``"<task>/<host>"``.
        test_accuracy: final network on the test split.
        val_accuracy: final validation accuracy.
        params: final parameters; params0: at reset.
        compute_gflops: training compute, ``sum over epochs of 3 * forward FLOPs per sample * train
            samples`` / 1e9 (forward + backward estimate; incubation passes not counted).
        germinated, fossilized, pruned, rollbacks: lifecycle counts.
        epochs: epochs trained (the budget, or fewer after a governor failure).
        decisions: non-WAIT actions as ``"epoch:OP:slot:blueprint"``, ``;``-separated.
        seconds: wall time of the episode's batch share.
        instance: the benchmark instance's name (`esper_fn.bench.Instance.name`); "" outside a
            benchmark.
        split: the instance's split, "train" or "test"; "" outside a benchmark.
        param_budget: the episode's parameter budget, or None (no budget, or outside a benchmark).
    """

    controller: str
    seed: int
    context: str
    test_accuracy: float
    val_accuracy: float
    params: int
    params0: int
    compute_gflops: float
    germinated: int = 0
    fossilized: int = 0
    pruned: int = 0
    rollbacks: int = 0
    epochs: int = 0
    decisions: str = ""
    seconds: float = 0.0
    instance: str = ""
    split: str = ""
    param_budget: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


def _chunks(seeds: Sequence[int], size: int) -> list[list[int]]:
    """Contiguous runs of seeds, at most `size` long (an env row i of an env seeded s plays s + i)."""
    out: list[list[int]] = []
    for s in seeds:
        if out and s == out[-1][-1] + 1 and len(out[-1]) < size:
            out[-1].append(s)
        else:
            out.append([s])
    return out


def run_episodes(env, policy, seeds: Sequence[int], space: ActionSpace, name: str, *,
                 exploration: ExplorationType = ExplorationType.DETERMINISTIC) -> list[RunRecord]:
    """Play one episode per row with ``env.set_seed(seeds[0])`` (rows play ``seeds[0] + i``).

    Args:
        env: the batched env, ``len(seeds)`` rows, seeds contiguous.
        policy: ``policy(td) -> td`` with ``"action"``.
        seeds: the run seeds of the rows.
        space: the env's action space (to decode decisions).
        name: the controller's name for the records.
        exploration: DETERMINISTIC (default: a probabilistic policy takes its mode) or RANDOM.

    Returns:
        One `RunRecord` per row.
    """
    N = int(env.batch_size[0])
    if list(seeds) != list(range(seeds[0], seeds[0] + N)):
        raise ConfigError(f"run_episodes needs {N} contiguous seeds, got {list(seeds)}.")
    if isinstance(policy, RandomPolicy):
        policy.reset_generator(seeds[0])
    t0 = time.perf_counter()
    env.set_seed(seeds[0])
    td = env.reset()
    names = [b.split("@")[0] for b in space.blueprints]
    ctx = [env.context(i) for i in range(N)]
    n_train = [c.task.split("train")[0].shape[0] for c in ctx]
    example = [c.task.split("val")[0][:1] for c in ctx]
    slot_names = [list(env.state(i).slot_names) for i in range(N)]
    params0 = [int(td["metrics", "params"][i]) for i in range(N)]
    compute = [0.0] * N
    counts = [{"germinated": 0, "fossilized": 0, "pruned": 0} for _ in range(N)]
    decisions: list[list[str]] = [[] for _ in range(N)]
    finished: dict[int, RunRecord] = {}
    epoch = 0
    while len(finished) < N:
        with torch.no_grad(), set_exploration_type(exploration):
            td = policy(td)
        for i, a in enumerate(td["action"].tolist()):
            if i in finished or a == 0:
                continue
            act = space.decode(a)
            if act.op == Op.GERMINATE:
                counts[i]["germinated"] += 1
                decisions[i].append(f"{epoch}:GERMINATE:{slot_names[i][act.slot]}:{act.blueprint.split('@')[0]}")
            else:
                b = int(td["slot_blueprint"][i, act.slot])
                if act.op != Op.ADVANCE:
                    counts[i]["fossilized" if act.op == Op.FOSSILIZE else "pruned"] += 1
                decisions[i].append(f"{epoch}:{act.op.name}:{slot_names[i][act.slot]}:"
                                    f"{names[b] if b < len(names) else '-'}")
        td = env.step(td)
        epoch += 1
        nxt = td["next"]
        done = nxt["done"].reshape(N).tolist()
        for i in range(N):
            if i not in finished:  # the network as it trained this epoch (after the action, before a reset)
                compute[i] += 3.0 * flops_per_sample(env.state(i), example[i]) * n_train[i] / 1e9
        for i in range(N):
            if done[i] and i not in finished:
                state = env.state(i)
                x, y = ctx[i].task.split("test")
                finished[i] = RunRecord(
                    controller=name, seed=int(env.run_seed(i)), context=ctx[i].name,
                    test_accuracy=evaluate(state, x, y)["accuracy"],
                    val_accuracy=float(nxt["metrics", "val_accuracy"][i]), params=int(state.num_params()),
                    params0=params0[i], compute_gflops=compute[i], rollbacks=int(nxt["metrics", "rollbacks"][i]),
                    epochs=epoch, decisions=";".join(decisions[i]), **counts[i])
        if len(finished) == N:
            break
        td = step_mdp(td)
        if any(done):  # a governor failure ended a row early: restart it (ignored) so the others go on
            td.set("_reset", torch.tensor([bool(d) for d in done]).reshape(N, 1))
            td = env.reset(td)  # the rows not reset keep their observation
    seconds = (time.perf_counter() - t0) / N
    out = [finished[i] for i in range(N)]
    for r in out:
        r.seconds = seconds
    return out


def evaluate_controllers(make_env: Callable[[int], Any], controllers: Mapping[str, Callable[[Any], Any]],
                         seeds: Sequence[int], space: ActionSpace, *, max_rows: int = 10,
                         progress: bool = True) -> list[RunRecord]:
    """Run every controller on every seed.

    Args:
        make_env: ``make_env(num_envs) -> env`` (the same env configuration for every controller).
        controllers: name -> ``make_policy(env)``.
        seeds: held-out run seeds (keep them outside the training range).
        space: the env's action space.
        max_rows: rows per env batch (contiguous seeds are batched).
        progress: a tqdm bar over (controller, batch).

    Returns:
        One `RunRecord` per (controller, seed).
    """
    chunks = _chunks(list(seeds), max_rows)
    envs: dict[int, Any] = {}
    records: list[RunRecord] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(controllers) * len(chunks), desc="eval", unit="batch")
    try:
        for name, make_policy in controllers.items():
            for chunk in chunks:
                env = envs.get(len(chunk))
                if env is None:
                    env = envs[len(chunk)] = make_env(len(chunk))
                policy = make_policy(env)
                records += run_episodes(env, policy, chunk, space, name)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(controller=name)
    finally:
        if bar is not None:
            bar.close()
    return records


def tune_baseline(make_env: Callable[[int], Any], name: str, grid: Sequence[Mapping[str, Any]],
                  make_policy: Callable[[Any, Mapping[str, Any]], Any], seeds: Sequence[int], space: ActionSpace,
                  *, max_rows: int = 10) -> tuple[dict[str, Any], list[tuple[dict[str, Any], float]]]:
    """Pick a baseline's parameters on training seeds by mean final VALIDATION accuracy (the test
    split is never used for tuning).

    Returns:
        (best parameters, [(parameters, mean validation accuracy), ...] for the whole grid).
    """
    scores = []
    for params in grid:
        recs = evaluate_controllers(make_env, {name: lambda env, p=params: make_policy(env, p)}, seeds, space,
                                    max_rows=max_rows, progress=False)
        scores.append((dict(params), sum(r.val_accuracy for r in recs) / len(recs)))
    best = max(scores, key=lambda s: s[1])[0]
    return best, scores


def _t(n: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1)) if n > 1 else float("nan")


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the two-sided 95% Student-t confidence interval); the half-width is NaN
    for fewer than two values, the mean NaN for none. The one interval every report and benchmark
    script quotes."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, _t(n) * sd / math.sqrt(n)


def paired(records: Sequence[RunRecord], a: str, b: str, key: str = "test_accuracy") -> tuple[float, float, int]:
    """Mean and 95% CI half-width of ``a - b`` on `key`, paired by seed; and the number of pairs."""
    ra = {r.seed: getattr(r, key) for r in records if r.controller == a}
    rb = {r.seed: getattr(r, key) for r in records if r.controller == b}
    common = sorted(set(ra) & set(rb))
    if not common:
        raise ConfigError(f"controllers {a!r} and {b!r} share no seed.")
    m, h = mean_ci([ra[s] - rb[s] for s in common])
    return m, h, len(common)


def summarize(records: Sequence[RunRecord], reference: str | None = None) -> str:
    """A readable report: one line per controller (test accuracy mean ± 95% CI, parameters,
    compute, lifecycle counts), then paired differences ``reference - other`` on test accuracy
    (points) and parameters.

    Args:
        records: from `evaluate_controllers`.
        reference: the controller the others are compared with (default: the first whose name
            starts with "tamiyo", else the last one).
    """
    names = list(dict.fromkeys(r.controller for r in records))
    if reference is None:
        reference = next((n for n in names if n.startswith("tamiyo")), names[-1])
    lines = [f"{'controller':<22} {'n':>3} {'test acc % (95% CI)':>22} {'params':>9} {'GFLOPs':>9} "
             f"{'germ/foss/prune':>16} {'rollbacks':>9}"]
    for n in names:
        rs = [r for r in records if r.controller == n]
        m, h = mean_ci([100 * r.test_accuracy for r in rs])
        p = sum(r.params for r in rs) / len(rs)
        c = sum(r.compute_gflops for r in rs) / len(rs)
        g = sum(r.germinated for r in rs) / len(rs)
        f = sum(r.fossilized for r in rs) / len(rs)
        pr = sum(r.pruned for r in rs) / len(rs)
        rb = sum(r.rollbacks for r in rs) / len(rs)
        lines.append(f"{n:<22} {len(rs):>3} {f'{m:.1f} ± {h:.1f}':>22} {p:>9.0f} {c:>9.2f} "
                     f"{f'{g:.1f}/{f:.1f}/{pr:.1f}':>16} {rb:>9.2f}")
    others = [n for n in names if n != reference]
    if others:
        lines.append("")
        lines.append(f"paired differences, {reference} - other (95% CI; by seed)")
        lines.append(f"{'other':<22} {'test acc (points)':>20} {'params':>18} {'excludes 0':>11}")
        for n in others:
            m, h, k = paired(records, reference, n)
            pm, ph, _ = paired(records, reference, n, "params")
            excl = "yes" if not math.isnan(h) and abs(100 * m) > 100 * h else "no"
            lines.append(f"{n:<22} {f'{100 * m:+.1f} ± {100 * h:.1f}':>20} {f'{pm:+.0f} ± {ph:.0f}':>18} {excl:>11}")
    return "\n".join(lines)


def write_csv(records: Sequence[RunRecord], path: str | Path) -> Path:
    """One row per run (the `RunRecord` fields but ``extra``; a budget of None is an empty cell).
    No records: the header alone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [k for k in RunRecord.__dataclass_fields__ if k != "extra"]
    rows = [{k: v for k, v in asdict(r).items() if k != "extra"} for r in records]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def read_csv(path: str | Path) -> list[RunRecord]:
    """Records written by `write_csv`. Files written before a field existed read it as its default
    (the benchmark's ``instance``, ``split`` and ``param_budget``); an empty ``param_budget`` is None.

    Raises:
        ConfigError: a column `RunRecord` has no field for, or a cell that does not parse (naming the
            row and column).
    """
    fields = RunRecord.__dataclass_fields__
    out = []
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        unknown = [k for k in reader.fieldnames or () if k not in fields or k == "extra"]
        if unknown:
            raise ConfigError(f"{path}: columns {unknown} are not RunRecord fields; is it a runs.csv written by "
                              "esper-fn eval or esper-fn bench run?")
        for row in reader:
            line = reader.line_num
            kw: dict[str, Any] = {}
            for k, v in row.items():
                if k is None:
                    raise ConfigError(f"{path}, line {line}: more cells than the {len(reader.fieldnames)} columns.")
                typ = fields[k].type
                try:
                    if typ == "int":
                        kw[k] = int(v)
                    elif typ == "float":
                        kw[k] = float(v)
                    elif typ == "int | None":
                        kw[k] = None if v == "" else int(v)
                    else:
                        kw[k] = v
                except (TypeError, ValueError):
                    raise ConfigError(f"{path}, line {line}: column {k!r} holds {v!r}, not a {typ}.") from None
            out.append(RunRecord(**kw))
    return out


def plot_runs(records: Sequence[RunRecord], path: str | Path, title: str = "") -> Path:
    """Test accuracy against final parameters, one point per run, one colour per controller; the
    controller means with 95% CI bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(dict.fromkeys(r.controller for r in records))
    for k, n in enumerate(names):
        rs = [r for r in records if r.controller == n]
        color = f"C{k % 10}"
        ax.scatter([r.params for r in rs], [100 * r.test_accuracy for r in rs], s=18, alpha=0.5, color=color)
        m, h = mean_ci([100 * r.test_accuracy for r in rs])
        ax.errorbar([sum(r.params for r in rs) / len(rs)], [m], yerr=[0 if math.isnan(h) else h], fmt="D",
                    color=color, markersize=8, capsize=4, label=f"{n} ({m:.1f}%)")
    ax.set_xlabel("final parameters")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "controllers on held-out seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tamiyo_policy(path: str | Path, space: ActionSpace, action_spec=None, *, device=None, **overrides):
    """Load Tamiyo's actor from a weights file for an env with this action space, on `device`
    (default: the action spec's device, else the CPU), where the env's observations are.

    Raises:
        TamiyoError: the weights were trained for other blueprints or tempos (the slot count is
            free: per-slot heads).
    """
    from ._tamiyo import TamiyoError, load_tamiyo

    actor, _, _ = load_tamiyo(path, action_spec, **overrides)
    actor.to(device if device is not None else action_spec.device if action_spec is not None else "cpu")
    c = actor.tamiyo_config
    if tuple(c.blueprints) != tuple(space.blueprints) or tuple(c.tempos) != tuple(space.tempos):
        raise TamiyoError(f"{path} was trained with blueprints {list(c.blueprints)} and tempos {list(c.tempos)}; "
                          f"this env offers {list(space.blueprints)} and {list(space.tempos)}. Build the env with "
                          "the same blueprints= and tempos=.")
    return actor
