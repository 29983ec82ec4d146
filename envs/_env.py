"""`MorphogenesisEnv`: morphogenetic training as a batched, reproducible TorchRL environment.

One step is one training epoch of every row's host plus its telemetry; the action is one lifecycle
request per row (germinate / advance / fossilize / prune / wait). The env is a thin shell over the
core: `esper_fn.training.train_epochs` (rows of one structure train in one stacked call),
`esper_fn.training.telemetry`, `esper_fn.legal_actions` (the action mask, gates included), the
lifecycle ops, and `esper_fn.run.governor_verdict` (rollbacks). Keys, shapes, features and formulas
are documented in docs/env.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

import esper_fn as ef
from esper_fn import CURVES, LIVE_STAGES, ConfigError, GateConfig, Host, Op, Stage, State
from esper_fn import blueprints as bpm
from esper_fn.controllers import Observation
from esper_fn.run import GovernorConfig, governor_verdict, rng_streams
from esper_fn.tasks import Task, load
from esper_fn.tezzeret import KernelCache
from esper_fn.training import TrainConfig, telemetry, train_epochs

from . import _features as feats
from ._actions import ActionSpace, EnvStateError, IllegalActionError, row_mask
from ._rewards import REWARDS, Reward, RewardInputs

__all__ = ["Context", "MorphogenesisEnv", "run_streams"]

_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """SplitMix64 finaliser: a well-spread 64-bit function of an integer (no process-random hash)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


@dataclass(frozen=True)
class RunStreams:
    """The random streams of one run: host init, data order and seed init."""

    host: torch.Generator
    data: torch.Generator
    seed: torch.Generator


def run_streams(run_seed: int) -> RunStreams:
    """The generators `esper_fn.run.grow` uses for run seed `run_seed` (`esper_fn.run.rng_streams`),
    so that an env row and ``esper-fn grow --seed run_seed`` draw the same host init, data order and
    seed init."""
    s = rng_streams(run_seed)
    return RunStreams(s["host"], s["data"], s["seeds"])


@dataclass(frozen=True, eq=False)
class Context:
    """One (task, host) pair an env row can train. Rows of one context share these objects, which
    is what lets them stack (`esper_fn.stack` needs the identical host object).

    Attributes:
        name: ``"<task>/<host>"``.
        task: the data (train and validation splits are used; the test split never is).
        host: the host definition.
    """

    name: str
    task: Task
    host: Host


def _subset(task: Task, subset: Mapping[str, int] | None) -> Task:
    if not subset:
        return task
    bad = set(subset) - {"train", "val"}
    if bad:
        raise ConfigError(f"subset keys must be 'train' and/or 'val', got {sorted(bad)}.")
    changes = {}
    for split, n in subset.items():
        x, y = task.split(split)
        if not isinstance(n, int) or not 1 <= n:
            raise ConfigError(f"subset[{split!r}] must be a positive int, got {n!r}.")
        changes[f"x_{split}"], changes[f"y_{split}"] = x[:n], y[:n]
    return replace(task, **changes)


def _build_host(name: str | Host, task: Task) -> Host:
    if isinstance(name, Host):
        return name
    return ef.hosts.preset(name, input_shape=task.input_shape, n_classes=task.n_classes)


def _blueprint_id(name: str) -> str:
    """The registered id of a blueprint id or bare name (its newest version), capabilities aside."""
    reg = bpm.registry()
    if name in reg:
        return name
    same = [b for b in reg.values() if b.meta.name == name]
    if not same:
        raise ConfigError(f"unknown blueprint {name!r}; see `esper_fn.blueprints.registry()`.")
    return max(same, key=lambda b: tuple(int(v) for v in b.meta.version.split("."))).id


@dataclass
class _Row:
    """Mutable bookkeeping of one env row (one host's episode)."""

    context: int
    run_seed: int
    streams: RunStreams
    state: State
    params0: int
    flops0: float
    metrics: dict[str, float]  # the last good epoch's train metrics + telemetry (or the reset evaluation)
    evals: list[dict[str, float]]  # validation metrics of the episode, the reset evaluation first
    good: list[dict[str, float]] = field(default_factory=list)  # metrics of good epochs (the governor's history)
    epoch: int = 0
    rollbacks: int = 0
    rolled_back: bool = False
    done: bool = False
    germinated: int = 0
    fossilized: int = 0
    pruned: int = 0


Lifecycle = Literal["auto", "full"]
_GATED = frozenset({int(Stage.TRAINING), int(Stage.BLENDING), int(Stage.HOLDING)})


class MorphogenesisEnv(EnvBase):
    """N host trainings in lockstep: one step is one epoch of every row, the action one lifecycle
    request per row.

    Args:
        contexts: ``[(task, host), ...]``: a task name (`esper_fn.tasks.load`) or `Task`, and a host
            preset name (built for the task's shapes) or `Host`. Each row draws its context at every
            reset from its run seed (see `set_seed`), uniformly.
        task, host: shorthand for ``contexts=[(task, host)]``.
        num_envs: N, the batch size.
        max_epochs: epochs per episode (the budget).
        reward: a `Reward` (`esper_fn.envs.rewards`) or the name of a built-in one with its
            default parameters ("delta_accuracy", "sparse_terminal", "contribution").
        lifecycle: "auto": the env advances every seed as soon as the gates allow (GERMINATED ->
            TRAINING at once, TRAINING -> BLENDING after ``gates.min_training_epochs``, BLENDING ->
            HOLDING at alpha 1), and the policy chooses germinations (slot, blueprint, tempo) and the
            verdict at HOLDING (fossilize or prune; also prune for a seed stuck in TRAINING because
            its gradient gate refuses); "full": the policy issues every op.
        seed: the env seed (`set_seed`).
        blueprints: the blueprint ids offered (default: the whole catalogue).
        tempos: blending tempos (epochs) a germination may choose.
        curve: the alpha curve of every blend.
        lr, seed_lr: Adam learning rates of the host and the seeds (seed_lr default: lr).
        train: batch size and incubation mode.
        gates: lifecycle gate thresholds (the mask includes them); default
            ``GateConfig(min_training_epochs=3)``.
        governor: rollback thresholds; more than ``governor.max_rollbacks`` rollbacks end the
            episode (terminated, with the reward's failure penalty).
        max_param_ratio: germinations that would take the network past this multiple of its
            parameters at reset are masked (None: no budget).
        task_kwargs: keyword arguments for `esper_fn.tasks.load` (e.g. ``{"seed": 3}``).
        subset: keep only the first samples of splits, e.g. ``{"train": 300, "val": 200}`` (tests).
        terminal_at_budget: at ``max_epochs`` set ``terminated`` as well as ``truncated`` (the
            episode's return is complete, so advantage estimation must not bootstrap; see
            docs/env.md). False leaves ``terminated`` False there.
        kernels: opt-in compiled train steps (`esper_fn.tezzeret.KernelCache`): each stacked group
            of rows trains through the kernel of its structure, compiled once when the structure is
            first seen (at the start of an epoch, never mid-epoch). Eager (None) is the default and
            the reference; compiled rows agree with it within float rounding.

    The env runs on the CPU (its hosts train where the tasks' tensors are); a policy on another
    device gets its inputs through the collector (``Collector(..., policy_device=...)``).

    Raises:
        ConfigError: invalid arguments.
    """

    def __init__(
        self,
        contexts: Sequence[tuple[str | Task, str | Host]] | None = None,
        *,
        task: str | Task | None = None,
        host: str | Host | None = None,
        num_envs: int = 1,
        max_epochs: int = 50,
        reward: Reward | str = "delta_accuracy",
        lifecycle: Lifecycle = "auto",
        seed: int = 0,
        blueprints: Sequence[str] | None = None,
        tempos: Sequence[int] = (3, 5, 8),
        curve: str = "linear",
        lr: float = 1e-2,
        seed_lr: float | None = None,
        train: TrainConfig | None = None,
        gates: GateConfig | None = None,
        governor: GovernorConfig | None = None,
        max_param_ratio: float | None = None,
        task_kwargs: Mapping | None = None,
        subset: Mapping[str, int] | None = None,
        terminal_at_budget: bool = True,
        kernels: KernelCache | None = None,
    ):
        if (contexts is None) == (task is None and host is None):
            raise ConfigError("pass either contexts=[(task, host), ...] or task= and host=, not both or neither.")
        if contexts is None:
            if task is None or host is None:
                raise ConfigError("the shorthand needs both task= and host=.")
            contexts = [(task, host)]
        if not contexts:
            raise ConfigError("contexts must name at least one (task, host) pair.")
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ConfigError(f"num_envs must be a positive int, got {num_envs!r}.")
        if not isinstance(max_epochs, int) or max_epochs < 1:
            raise ConfigError(f"max_epochs must be a positive int, got {max_epochs!r}.")
        if lifecycle not in ("auto", "full"):
            raise ConfigError(f"lifecycle must be 'auto' or 'full', got {lifecycle!r}.")
        if curve not in CURVES:
            raise ConfigError(f"curve must be one of {CURVES}, got {curve!r}.")
        tempos = tuple(int(t) for t in tempos)
        if not tempos or min(tempos) < 1 or len(set(tempos)) != len(tempos):
            raise ConfigError(f"tempos must be distinct positive epoch counts, got {tempos}.")
        if isinstance(reward, str):
            if reward not in REWARDS:
                raise ConfigError(f"unknown reward {reward!r}; built-in rewards are {sorted(REWARDS)}.")
            reward = REWARDS[reward]()
        super().__init__(batch_size=torch.Size([num_envs]))  # CPU: the hosts train where the tasks' tensors are
        self.num_envs = num_envs
        self.max_epochs = max_epochs
        self.reward_fn: Reward = reward
        self.lifecycle: Lifecycle = lifecycle
        self.curve = curve
        self.train_config = train or TrainConfig()
        self.gates = gates or GateConfig(min_training_epochs=3)
        self.governor = governor or GovernorConfig()
        self.max_param_ratio = max_param_ratio
        self.terminal_at_budget = terminal_at_budget
        self.kernels = kernels
        self.optimizer = ef.optim.adam({"host": lr, "seeds": seed_lr or lr})

        tasks: dict[str, Task] = {}
        built = []
        for t, h in contexts:
            if isinstance(t, Task):
                tk = _subset(t, subset)
            else:
                if t not in tasks:  # one Task object per task name: rows of one context must share it
                    tasks[t] = _subset(load(t, **dict(task_kwargs or {})), subset)
                tk = tasks[t]
            hst = _build_host(h, tk)
            built.append(Context(f"{tk.name}/{hst.name}", tk, hst))
        self.contexts: tuple[Context, ...] = tuple(built)

        ids = tuple(_blueprint_id(b) for b in blueprints) if blueprints is not None else tuple(bpm.registry())
        if len(set(ids)) != len(ids):
            raise ConfigError(f"blueprints must be distinct, got {list(ids)}.")
        probes = [ef.init(c.host, optimizer=self.optimizer, generator=torch.Generator().manual_seed(0))
                  for c in self.contexts]
        self._specs0 = [list(p.slot_specs()) for p in probes]
        self.max_slots = max(len(s) for s in self._specs0)
        self.max_nodes = max(len(feats.graph_nodes(s)) for s in self._specs0)
        self.max_edges = max(2 * (self.max_nodes - 1), 1)
        self.action_space = ActionSpace(self.max_slots, ids, tempos)
        self._rows: list[_Row | None] = [None] * num_envs
        self._mask = torch.zeros(num_envs, self.action_space.n, dtype=torch.bool)
        self._mask_cache: dict = {}
        self._make_specs()
        self.set_seed(seed)

    # -- specs -----------------------------------------------------------------------------------
    def _make_specs(self) -> None:
        N, S, L, E = self.num_envs, self.max_slots, self.max_nodes, self.max_edges
        B, A = len(self.action_space.blueprints), self.action_space.n
        f32 = torch.float32
        metrics = Composite(
            {k: Unbounded(shape=(N,), dtype=f32) for k in
             ("val_accuracy", "val_loss", "train_loss", "params", "param_ratio", "epoch", "rollbacks")},
            shape=(N,),
        )
        self.observation_spec = Composite(
            slot_features=Unbounded(shape=(N, S, len(feats.SLOT_FEATURES)), dtype=f32),
            slot_mask=Categorical(2, shape=(N, S), dtype=torch.bool),
            slot_blueprint=Categorical(B + 1, shape=(N, S), dtype=torch.int64),
            node_features=Unbounded(shape=(N, L, len(feats.NODE_FEATURES)), dtype=f32),
            node_mask=Categorical(2, shape=(N, L), dtype=torch.bool),
            node_slot=Bounded(-1, S - 1, shape=(N, L), dtype=torch.int64),
            edge_index=Bounded(0, L - 1, shape=(N, 2, E), dtype=torch.int64),
            edge_mask=Categorical(2, shape=(N, E), dtype=torch.bool),
            global_features=Unbounded(shape=(N, len(feats.GLOBAL_FEATURES)), dtype=f32),
            action_mask=Categorical(2, shape=(N, A), dtype=torch.bool),
            context=Categorical(len(self.contexts), shape=(N,), dtype=torch.int64),
            metrics=metrics,
            shape=(N,),
        )
        self.action_spec = Categorical(A, shape=(N,), dtype=torch.int64)
        self.reward_spec = Unbounded(shape=(N, 1), dtype=f32)
        self.done_spec = Composite(
            done=Categorical(2, shape=(N, 1), dtype=torch.bool),
            terminated=Categorical(2, shape=(N, 1), dtype=torch.bool),
            truncated=Categorical(2, shape=(N, 1), dtype=torch.bool),
            shape=(N,),
        )

    # -- seeding ---------------------------------------------------------------------------------
    def _set_seed(self, seed: int | None) -> None:
        """Restart the run-seed enumeration: the k-th episode of row i (counting from this call) is
        run seed ``seed + i + k * num_envs``; its context, host init, data order and seed init all
        derive from that run seed (`run_streams`)."""
        self._seed = 0 if seed is None else int(seed)
        self._episodes = [0] * self.num_envs

    def run_seed(self, row: int) -> int:
        """The run seed of row `row`'s current episode (``esper-fn grow --seed`` reproduces it)."""
        return self._row(row).run_seed

    # -- rows ------------------------------------------------------------------------------------
    def _row(self, i: int) -> _Row:
        row = self._rows[i]
        if row is None:
            raise EnvStateError(f"row {i} has not been reset yet; call env.reset() first.")
        return row

    def state(self, row: int) -> State:
        """The current training state of a row (for evaluation outside the env, e.g. on the test split)."""
        return self._row(row).state

    def context(self, row: int) -> Context:
        """The context a row trains in its current episode."""
        return self.contexts[self._row(row).context]

    def _reset_row(self, i: int) -> None:
        k = self._episodes[i]
        self._episodes[i] += 1
        run_seed = self._seed + i + k * self.num_envs
        c = 0 if len(self.contexts) == 1 else int(
            torch.randint(len(self.contexts), (1,), generator=torch.Generator().manual_seed(_mix(run_seed))))
        ctx = self.contexts[c]
        streams = run_streams(run_seed)
        state = ef.init(ctx.host, optimizer=self.optimizer, generator=streams.host)
        with torch.no_grad():
            m = telemetry(state, ctx.task, {})
        self._rows[i] = _Row(context=c, run_seed=run_seed, streams=streams, state=state,
                             params0=state.num_params(), flops0=m["flops"], metrics=m,
                             evals=[{"val_accuracy": m["val_accuracy"], "val_loss": m["val_loss"]}])

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        reset = None
        if tensordict is not None and "_reset" in tensordict.keys():
            reset = tensordict.get("_reset").reshape(self.num_envs).tolist()
        for i in range(self.num_envs):
            if reset is None or reset[i] or self._rows[i] is None:
                self._reset_row(i)
        out = self._observe()
        false = torch.zeros(self.num_envs, 1, dtype=torch.bool)
        out.update({"done": false, "terminated": false.clone(), "truncated": false.clone()})
        return out

    # -- the step --------------------------------------------------------------------------------
    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        actions = tensordict.get("action").reshape(self.num_envs).tolist()
        # Collectors and rollouts step under no_grad; training a host needs autograd.
        with torch.enable_grad():
            return self._advance(actions)

    def _check(self, i: int, row: _Row, index: int) -> None:
        """Raise `IllegalActionError` unless `index` is in row i's current mask."""
        if 0 <= index < self.action_space.n and self._mask[i, index]:
            return
        a = self.action_space
        legal = self._mask[i].nonzero().flatten().tolist()
        what = a.describe(index, row.state.slot_names) if 0 <= index < a.n else f"outside [0, {a.n})"
        raise IllegalActionError(
            f"row {i}: action {index} ({what}) is masked out (stage of the slots: "
            f"{ {n: s.name for n, s in row.state.stages().items()} }, lifecycle={self.lifecycle!r}); "
            f"{len(legal)} actions are legal now, e.g. {[a.describe(j, row.state.slot_names) for j in legal[:4]]}. "
            "Sample from observation['action_mask'] (torchrl.modules.MaskedCategorical).")

    def _apply(self, row: _Row, index: int) -> tuple[State, float]:
        """Apply a checked action to a row; returns the new state and the contribution it fossilized."""
        act = self.action_space.decode(index)
        state, m = row.state, row.metrics
        if act.op == Op.WAIT:
            return state, 0.0
        slot = state.slot_names[act.slot]
        if act.op == Op.GERMINATE:
            row.germinated += 1
            return ef.germinate(state, slot, act.blueprint, generator=row.streams.seed, tempo=act.tempo,
                                curve=self.curve), 0.0
        if act.op == Op.ADVANCE:
            return ef.advance(state, slot, gates=self.gates, telemetry=m), 0.0
        if act.op == Op.FOSSILIZE:
            row.fossilized += 1
            return ef.fossilize(state, slot, gates=self.gates, telemetry=m), m.get(f"{slot}/contribution", 0.0)
        row.pruned += 1
        return ef.prune(state, slot), 0.0

    def _advance(self, actions: list[int]) -> TensorDictBase:
        N = self.num_envs
        rows = [self._row(i) for i in range(N)]
        for i, row in enumerate(rows):  # every check before any change: a refused step changes nothing
            if row.done:
                raise EnvStateError(f"row {i} finished its episode; reset it before stepping (TorchRL does so "
                                 "through the '_reset' mask: use env.step_and_maybe_reset or a collector).")
            self._check(i, row, actions[i])
        prev_acc = [r.metrics["val_accuracy"] for r in rows]
        prev_ratio = [r.state.num_params() / r.params0 for r in rows]
        before, fossil = [], []
        for i, row in enumerate(rows):
            state, c = self._apply(row, actions[i])
            fossil.append(c)
            before.append(ef.tick(state, gates=self.gates))
        results = train_epochs(before, [self.contexts[r.context].task for r in rows], self.train_config,
                               generators=[r.streams.data for r in rows], kernels=self.kernels)
        metrics = self._telemetry([s for s, _ in results], [m for _, m in results], rows)
        rolled, failed = [False] * N, [False] * N
        for i, (row, (new, _), m) in enumerate(zip(rows, results, metrics)):
            row.epoch += 1
            m["epoch"] = float(row.epoch)
            reason = governor_verdict(m, row.good, self.contexts[row.context].task.n_classes, self.governor)
            row.rolled_back = reason is not None
            if reason is not None:
                rolled[i] = True
                row.rollbacks += 1
                state = before[i]
                for n in state.slot_names:
                    if state.stage(n) in LIVE_STAGES:
                        state = ef.prune(state, n)
                        row.pruned += 1
                row.state = state
                train_part = {k: v for k, v in row.metrics.items()
                              if k in ("train_loss", "train_accuracy", "shadow_loss") or k.startswith("grad_norm/")}
                with torch.no_grad():
                    row.metrics = {**train_part, **telemetry(state, self.contexts[row.context].task, train_part),
                                   "epoch": float(row.epoch)}
                failed[i] = row.rollbacks > self.governor.max_rollbacks
            else:
                row.state, row.metrics = new, m
                row.good.append(m)
                if self.lifecycle == "auto":
                    row.state = self._auto_advance(row.state, m)
            row.evals.append({"val_accuracy": row.metrics["val_accuracy"], "val_loss": row.metrics["val_loss"]})
        budget = [r.epoch >= self.max_epochs for r in rows]
        done = [f or b for f, b in zip(failed, budget)]
        terminated = [f or (b and self.terminal_at_budget) for f, b in zip(failed, budget)]
        for row, d in zip(rows, done):
            row.done = d
        t = lambda v, dt=torch.float32: torch.tensor(v, dtype=dt)  # noqa: E731
        reward = self.reward_fn(RewardInputs(
            val_accuracy=t([r.metrics["val_accuracy"] for r in rows]), prev_val_accuracy=t(prev_acc),
            param_ratio=t([r.state.num_params() / r.params0 for r in rows]), prev_param_ratio=t(prev_ratio),
            fossilized_contribution=t(fossil), rolled_back=t(rolled, torch.bool), failed=t(failed, torch.bool),
            done=t(done, torch.bool)))
        out = self._observe()
        out.set("reward", reward.to(torch.float32).reshape(N, 1))
        out.set("done", t(done, torch.bool).reshape(N, 1))
        out.set("terminated", t(terminated, torch.bool).reshape(N, 1))
        out.set("truncated", t(budget, torch.bool).reshape(N, 1))
        return out

    def _telemetry(self, states: list[State], train_metrics: list[dict], rows: list[_Row]) -> list[dict]:
        """Telemetry of every row (train metrics merged in), measured row by row.

        The core can measure a stacked group in one vmapped pass, but measured on this env's rows
        that is at best ~1.2x faster (16 dormant MNIST-1D rows: 15 vs 17 ms) and 2x slower where the
        rows carry conv seeds (8 conv1d_k5 rows: 176 vs 84 ms: over the 1000 validation samples the
        per-host conv seeds run as batched skinny matmuls, [8, 44000, 16] @ [8, 16, 5] alone takes
        ~48 ms), so rows are measured one by one.
        """
        with torch.no_grad():
            return [{**m, **telemetry(s, self.contexts[r.context].task, m)}
                    for s, m, r in zip(states, train_metrics, rows)]

    def _auto_advance(self, state: State, m: Mapping[str, float]) -> State:
        """The auto lifecycle: every seed advances as soon as the gates allow (GERMINATED -> TRAINING
        at once, TRAINING -> BLENDING after ``gates.min_training_epochs``, BLENDING -> HOLDING at
        alpha 1), as `esper_fn.controllers.manage_seeds` does for the heuristics."""
        legal = ef.legal_actions(state, gates=self.gates, telemetry=m)
        for name in state.slot_names:
            entry = legal[name]
            if Op.ADVANCE in entry["ops"] and entry["stage"] in (Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING):
                state = ef.advance(state, name, gates=self.gates, telemetry=m)
        return state

    # -- observations ----------------------------------------------------------------------------
    def _graph(self, n_nodes: int) -> tuple[list[list[int]], list[bool]]:
        """Padded edge list ([2][E]) and edge mask ([E]) of a chain of `n_nodes` nodes."""
        E = self.max_edges
        edges = feats.graph_edges(n_nodes)
        src = [a for a, _ in edges] + [0] * (E - len(edges))
        dst = [b for _, b in edges] + [0] * (E - len(edges))
        return [src, dst], [True] * len(edges) + [False] * (E - len(edges))

    def _observe(self) -> TensorDictBase:
        N, S, L = self.num_envs, self.max_slots, self.max_nodes
        space = self.action_space
        B = len(space.blueprints)
        zs, zn = [0.0] * len(feats.SLOT_FEATURES), [0.0] * len(feats.NODE_FEATURES)
        cols: dict[str, list] = {k: [] for k in ("slot_f", "slot_mask", "slot_bp", "node_f", "node_mask",
                                                 "node_slot", "edge_index", "edge_mask", "glob", "context")}
        mvals: dict[str, list[float]] = {k: [] for k in ("val_accuracy", "val_loss", "train_loss", "params",
                                                         "param_ratio", "epoch", "rollbacks")}
        bp_index = {b: j for j, b in enumerate(space.blueprints)}
        for i in range(N):
            row = self._row(i)
            ctx = self.contexts[row.context]
            state, m = row.state, row.metrics
            specs = list(state.slot_specs())
            s_rows = feats.slot_rows(state, specs, m, row.params0)
            n_s = len(s_rows)
            cols["slot_f"].append(s_rows + [zs] * (S - n_s))
            cols["slot_mask"].append([True] * n_s + [False] * (S - n_s))
            cols["slot_bp"].append([bp_index.get(b, B) if b is not None else B for b in state.blueprints]
                                   + [B] * (S - n_s))
            nodes = feats.graph_nodes(specs)
            n_n = len(nodes)
            cols["node_f"].append(feats.node_rows(state, specs, s_rows) + [zn] * (L - n_n))
            cols["node_mask"].append([True] * n_n + [False] * (L - n_n))
            cols["node_slot"].append([s if k == "slot" else -1 for k, s in nodes] + [-1] * (L - n_n))
            edge_index, edge_mask = self._graph(n_n)
            cols["edge_index"].append(edge_index)
            cols["edge_mask"].append(edge_mask)
            params = state.num_params()
            cols["glob"].append(feats.global_row(
                epoch=row.epoch, max_epochs=self.max_epochs, metrics=m, history=row.evals,
                n_classes=ctx.task.n_classes, params=params, params0=row.params0, flops=m.get("flops", 0.0),
                flops0=row.flops0, state=state, fossilized=row.fossilized, germinated=row.germinated,
                rollbacks=row.rollbacks, max_rollbacks=self.governor.max_rollbacks))
            cols["context"].append(row.context)
            for k, v in (("val_accuracy", m["val_accuracy"]), ("val_loss", m["val_loss"]),
                         ("train_loss", m.get("train_loss", m["val_loss"])), ("params", float(params)),
                         ("param_ratio", params / row.params0), ("epoch", float(row.epoch)),
                         ("rollbacks", float(row.rollbacks))):
                mvals[k].append(v)
            self._mask[i] = self._row_mask(row)
        mask = self._mask.clone()
        self.action_spec.update_mask(mask)
        f32, i64, b8 = torch.float32, torch.int64, torch.bool
        return TensorDict(
            {"slot_features": torch.tensor(cols["slot_f"], dtype=f32),
             "slot_mask": torch.tensor(cols["slot_mask"], dtype=b8),
             "slot_blueprint": torch.tensor(cols["slot_bp"], dtype=i64),
             "node_features": torch.tensor(cols["node_f"], dtype=f32),
             "node_mask": torch.tensor(cols["node_mask"], dtype=b8),
             "node_slot": torch.tensor(cols["node_slot"], dtype=i64),
             "edge_index": torch.tensor(cols["edge_index"], dtype=i64),
             "edge_mask": torch.tensor(cols["edge_mask"], dtype=b8),
             "global_features": torch.tensor(cols["glob"], dtype=f32),
             "action_mask": mask,
             "context": torch.tensor(cols["context"], dtype=i64),
             "metrics": TensorDict({k: torch.tensor(v, dtype=f32) for k, v in mvals.items()}, batch_size=[N])},
            batch_size=[N],
        )

    def _row_mask(self, row: _Row) -> torch.Tensor:
        state = row.state
        if row.done:
            return row_mask(self.action_space, (), {}, advance=False, prunable=None, room=None, param_cost={})
        stages = tuple(state.slots["stage"].tolist())
        key = None
        if not _GATED.intersection(stages):
            # No slot is where a gate reads epochs or telemetry: the mask is a function of the structure
            # (host, blueprints, shapes: hence the parameter count) and the stages alone.
            key = (ef.structure(state), stages, row.params0)
            cached = self._mask_cache.get(key)
            if cached is not None:
                return cached
        mask = self._compute_mask(row)
        if key is not None:
            if len(self._mask_cache) > 4096:
                self._mask_cache.clear()
            self._mask_cache[key] = mask
        return mask

    def _compute_mask(self, row: _Row) -> torch.Tensor:
        state = row.state
        legal = ef.legal_actions(state, gates=self.gates, telemetry=row.metrics)
        prunable = None
        if self.lifecycle == "auto":
            # The verdict at HOLDING, and the way out for a seed whose gradient gate keeps it in TRAINING.
            epochs = state.slots["epochs"].tolist()
            prunable = {n for i, n in enumerate(state.slot_names)
                        if legal[n]["stage"] == Stage.HOLDING
                        or (legal[n]["stage"] == Stage.TRAINING and Op.ADVANCE not in legal[n]["ops"]
                            and epochs[i] >= self.gates.min_training_epochs)}
        room, cost = None, {}
        if self.max_param_ratio is not None:
            room = self.max_param_ratio * row.params0 - state.num_params()
            reg = bpm.registry()
            for name, entry in legal.items():
                spec = state.spec(name)
                for bid in entry["blueprints"]:
                    cost[(name, bid)] = reg[bid].param_count(spec)
        return row_mask(self.action_space, state.slot_names, legal, advance=self.lifecycle == "full",
                        prunable=prunable, room=room, param_cost=cost)

    # -- the core's view, for controllers written against esper_fn.controllers ---------------------
    def core_observation(self, row: int, *, param_budget: int | None = None) -> Observation | None:
        """What `esper_fn.run.grow` would show its controller after the row's last epoch, or None
        where grow consults no controller (before the first epoch, and after a rollback).

        Args:
            row: the row index.
            param_budget: the budget the controller is told about (`RunConfig.param_budget`).
        """
        r = self._row(row)
        if r.epoch == 0 or r.rolled_back or r.done:
            return None
        legal = ef.legal_actions(r.state, gates=self.gates, telemetry=r.metrics)
        return Observation(r.epoch, self.max_epochs, r.state, r.metrics, r.good[:-1], legal, param_budget)

    def describe_action(self, row: int, index: int) -> str:
        """A readable form of an action for a row, with its slot names."""
        return self.action_space.describe(index, self._row(row).state.slot_names)

    def __repr__(self) -> str:
        return (f"MorphogenesisEnv(contexts={[c.name for c in self.contexts]}, num_envs={self.num_envs}, "
                f"max_epochs={self.max_epochs}, lifecycle={self.lifecycle!r}, actions={self.action_space.n})")

