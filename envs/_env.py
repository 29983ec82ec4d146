"""`MorphogenesisEnv`: morphogenetic training as a batched, reproducible TorchRL environment.

One step is one training epoch of every row's host plus its telemetry; the action is one lifecycle
request per row (germinate / advance / fossilize / prune / wait). The env is a thin shell over the
core's growth step: every row is an `esper_fn.episode.Episode`, `_step` decodes the actions into
core `Action`s, calls `esper_fn.episode.step` (decisions, tick, batched training, telemetry, governor,
automatic lifecycle: the step `esper-fn grow` drives too), observes the new episodes with `Observer`
and computes the reward. Keys, shapes, features and formulas are documented in docs/env.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from tensordict import TensorDictBase
from torchrl.envs import EnvBase

import esper_fn as ef
from esper_fn import CURVES, ConfigError, EsperError, GateConfig, Host
from esper_fn import blueprints as bpm
from esper_fn import karn
from esper_fn._device import check_device
from esper_fn.actions import ActionSpace, IllegalActionError, to_action
from esper_fn.bench import Instance
from esper_fn.episode import (SCULPT_KEEP, Episode, GovernorConfig, Rules, episode_from_tensors, episode_to_tensors,
                              start, step)
from esper_fn.events import Fossilized
from esper_fn.tasks import Task, load
from esper_fn.tezzeret import KernelCache
from esper_fn.training import TrainConfig

from ._features import graph_nodes
from ._observe import Observer
from .rewards import REWARDS, Reward, RewardInputs

__all__ = ["Context", "EnvStateError", "MorphogenesisEnv"]

_MASK64 = (1 << 64) - 1


class EnvStateError(EsperError, RuntimeError):
    """The environment was used out of order (a row stepped before its reset or after its end)."""


def _mix(x: int) -> int:
    """SplitMix64 finaliser: a well-spread 64-bit function of an integer (no process-random hash)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


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
    """The registered id of a blueprint id or bare name (its newest version), capabilities aside. A
    Karn id (``karn_...@x.y.z``) is generated and registered here if this process has not yet
    (`esper_fn.karn.blueprint`): its id is its whole definition."""
    if karn.is_generated(name) and "@" in name:
        return karn.blueprint(name).id
    bid = bpm.resolve(name)
    if bid is None:
        raise ConfigError(f"unknown blueprint {name!r}; see `esper_fn.blueprints.registry()`.")
    return bid


class MorphogenesisEnv(EnvBase):
    """N host trainings in lockstep: one step is one epoch of every row, the action one lifecycle
    request per row.

    Args:
        contexts: ``[(task, host), ...]``: a task name (`esper_fn.tasks.load`) or `Task`, and a host
            preset name (built for the task's shapes) or `Host`. Each row draws its context at every
            reset from its run seed (see `set_seed`), uniformly.
        task, host: shorthand for ``contexts=[(task, host)]``.
        instances: instead of contexts, `esper_fn.bench.Instance`s (e.g. a suite's split): each row
            draws one at every reset (uniformly, from its run seed) and plays it as ``esper-fn grow``
            would: the task split by the run seed (``train_subset`` applied), the host built for it,
            the instance's epochs, parameter budget and learning rate. `max_epochs` is then the
            padding of the observation's history (default: the longest instance).
        num_envs: N, the batch size.
        max_epochs: epochs per episode (the budget; default 50, or the longest instance).
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
            ``GateConfig(min_training_epochs=3, max_grad_norm=1e3)`` (and GateConfig's contribution
            gate: fossilize only a seed whose measured contribution is significantly above 0).
        governor: rollback thresholds; more than ``governor.max_rollbacks`` rollbacks end the
            episode (terminated, with the reward's failure penalty).
        max_param_ratio: the episode's parameter budget is ``floor(max_param_ratio x`` the host's
            parameters at reset``)``: germinations that would take the network past it are masked
            (None: no budget).
        task_kwargs: keyword arguments for `esper_fn.tasks.load` (e.g. ``{"seed": 3}``).
        subset: keep only the first samples of splits, e.g. ``{"train": 300, "val": 200}`` (tests).
        terminal_at_budget: at ``max_epochs`` set ``terminated`` as well as ``truncated`` (the
            episode's return is complete, so advantage estimation must not bootstrap; see
            docs/env.md). False leaves ``terminated`` False there.
        kernels: opt-in compiled train steps (`esper_fn.tezzeret.KernelCache`): each stacked group
            of rows trains through the kernel of its structure, compiled once when the structure is
            first seen (at the start of an epoch, never mid-epoch). Eager (None) is the default and
            the reference; compiled rows agree with it within float rounding.
        max_slots: slot positions of the action space (default: the most slots of any host here);
            give a suite's ``num_slots`` so that envs over different instances share one action space
            and one observation layout (graph nodes padded to ``2 * max_slots - 1``).
        device: where the hosts train ("cpu", "cuda", "cuda:1"; default the CPU). Given `Task`s are
            moved there (`Task.to`); a seed plays the same episode on every device, to the device's
            float rounding (weights and data orders are drawn on CPU generators).
        sculpt: also offer SCULPT at every slot (Emrakul, `esper_fn.sculpt`; S more actions after
            PRUNE, so the default layout, and the policies trained on it, are unchanged). SCULPT slot
            s removes hidden units of its fossilized seed or of the host layer it follows, keeping
            `sculpt_keep` of them (at least one goes), chosen by their measured contribution on the
            validation split; it is masked wherever it could not apply
            (`esper_fn.episode.sculpt_offered`).
        sculpt_keep: the fraction of a target's units one SCULPT keeps, in (0, 1) (default 0.75).

    Every row is an `esper_fn.episode.Episode`; a step is `esper_fn.episode.step` over all rows (the
    same function `esper-fn grow` loops over), then `Observer` (the observation, pure) and the reward.
    `episode(i)` gives row i's record.

    The hosts train on `device`, where the tasks' tensors are moved (batches are indexed there);
    specs, observations, rewards and done flags are on it too, as TorchRL envs do. Observations are
    built from the per-epoch numbers a decision needs anyway, so a step synchronises with the device
    once per epoch, not per batch. A policy on another device than the env gets its inputs through
    the collector (``Collector(..., policy_device=...)``).

    Raises:
        ConfigError: invalid arguments (a `device` that is not a device, or "meta").
        CapabilityError: a device this machine does not have (e.g. "cuda" without a GPU).
    """

    def __init__(
        self,
        contexts: Sequence[tuple[str | Task, str | Host]] | None = None,
        *,
        task: str | Task | None = None,
        host: str | Host | None = None,
        instances: Sequence[Instance] | None = None,
        num_envs: int = 1,
        max_epochs: int | None = None,
        reward: Reward | str = "delta_accuracy",
        lifecycle: str = "auto",
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
        max_slots: int | None = None,
        device: torch.device | str | None = None,
        sculpt: bool = False,
        sculpt_keep: float = SCULPT_KEEP,
    ):
        given = [name for name, v in (("contexts", contexts), ("task/host", task or host), ("instances", instances))
                 if v is not None]
        if len(given) != 1:
            raise ConfigError(f"pass one of contexts=[(task, host), ...], task= and host=, or instances=[...]; got "
                              f"{given or 'none'}.")
        if task is not None or host is not None:
            if task is None or host is None:
                raise ConfigError("the shorthand needs both task= and host=.")
            contexts = [(task, host)]
        if contexts is not None and not contexts:
            raise ConfigError("contexts must name at least one (task, host) pair.")
        if instances is not None:
            instances = tuple(instances)
            if not instances or not all(isinstance(i, Instance) for i in instances):
                raise ConfigError("instances must be a non-empty sequence of esper_fn.bench.Instance.")
            if subset or task_kwargs or max_param_ratio is not None:
                raise ConfigError("with instances=, the instance sets the data, budget and learning rate: drop "
                                  "subset=, task_kwargs= and max_param_ratio=.")
            horizon = max(i.epochs for i in instances)
            if max_epochs is not None and max_epochs < horizon:
                raise ConfigError(f"max_epochs={max_epochs} is shorter than the longest instance ({horizon} epochs).")
            max_epochs = max_epochs or horizon
        max_epochs = 50 if max_epochs is None else max_epochs
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
        if not isinstance(sculpt_keep, (int, float)) or not 0.0 < sculpt_keep < 1.0:
            raise ConfigError(f"sculpt_keep must lie in (0, 1) (the fraction of a target's units one SCULPT keeps), got "
                              f"{sculpt_keep!r}.")
        if max_param_ratio is not None and not max_param_ratio > 0:
            raise ConfigError(f"max_param_ratio must be positive (or None), got {max_param_ratio!r}.")
        device = check_device(device, "MorphogenesisEnv") or torch.device("cpu")
        if device.type == "meta":
            raise ConfigError("MorphogenesisEnv: hosts cannot train on the 'meta' device (it holds no values); use "
                              "device='cpu' or 'cuda'.")
        super().__init__(batch_size=torch.Size([num_envs]), device=device)  # the hosts train where the tasks are
        self.num_envs = num_envs
        self.max_epochs = max_epochs
        self.reward_fn: Reward = reward
        self.lifecycle = lifecycle
        self.curve = curve
        self.max_param_ratio = max_param_ratio
        self.terminal_at_budget = terminal_at_budget
        self.optimizer = ef.optim.adam({"host": lr, "seeds": seed_lr or lr})
        self.rules = Rules(train=train or TrainConfig(), gates=gates or GateConfig(min_training_epochs=3, max_grad_norm=1e3),
                           governor=governor or GovernorConfig(), lifecycle=lifecycle, kernels=kernels)

        self.instances: tuple[Instance, ...] = instances or ()
        self._tasks: dict[tuple, Task] = {}  # (name, seed, subset) -> Task: rows of one draw share it
        self._hosts: dict[tuple, Host] = {}  # (preset, input shape, classes) -> Host: what lets rows stack
        self._optimizers: dict[float, ef.optim.Optimizer] = {}
        built = []
        tasks: dict[str, Task] = {}
        for t, h in contexts or ():
            if isinstance(t, Task):
                tk = _subset(t, subset)
                tk = tk if tk.device == device else tk.to(device)
            else:
                if t not in tasks:  # one Task object per task name: rows of one context must share it
                    tasks[t] = _subset(load(t, **{**dict(task_kwargs or {}), "device": device}), subset)
                tk = tasks[t]
            hst = _build_host(h, tk)
            built.append(Context(f"{tk.name}/{hst.name}", tk, hst))
        self.contexts: tuple[Context, ...] = tuple(built)

        ids = tuple(_blueprint_id(b) for b in blueprints) if blueprints is not None else tuple(bpm.registry())
        if len(set(ids)) != len(ids):
            raise ConfigError(f"blueprints must be distinct, got {list(ids)}.")
        hosts = [c.host for c in self.contexts] or [self._instance_host(i, self._instance_task(i, 0))
                                                   for i in self.instances]
        probes = [ef.init(h, optimizer=self.optimizer, generator=torch.Generator().manual_seed(0)) for h in hosts]
        specs0 = [list(p.slot_specs()) for p in probes]
        most = max(len(s) for s in specs0)
        if max_slots is not None and max_slots < most:
            raise ConfigError(f"max_slots={max_slots} is fewer than the {most} slots of a host here.")
        self.action_space = ActionSpace(max_slots or most, ids, tempos, sculpt=bool(sculpt), sculpt_keep=float(sculpt_keep))
        nodes = max(len(graph_nodes(s)) for s in specs0)
        if max_slots is not None:  # one observation layout for every env of a suite: a layer before each slot
            nodes = max(nodes, 2 * max_slots - 1)
        self.observer = Observer(self.action_space, max_nodes=nodes,
                                 horizon=max_epochs + 1, gates=self.rules.gates, lifecycle=lifecycle,
                                 max_rollbacks=self.rules.governor.max_rollbacks)
        self._episodes: list[Episode | None] = [None] * num_envs
        self._context: list[int] = [0] * num_envs
        self._run_seeds: list[int] = [0] * num_envs
        self._mask = torch.zeros(num_envs, self.action_space.n, dtype=torch.bool)
        self._make_specs()
        self.set_seed(seed)

    @property
    def max_slots(self) -> int:
        """S, the slot positions of the action space and of the padded observation."""
        return self.action_space.num_slots

    @property
    def max_nodes(self) -> int:
        """L, graph nodes per row of the padded observation."""
        return self.observer.max_nodes

    @property
    def max_edges(self) -> int:
        """E, graph edges per row of the padded observation."""
        return self.observer.max_edges

    @property
    def gates(self) -> GateConfig:
        """The lifecycle gates (the mask includes them)."""
        return self.rules.gates

    @property
    def governor(self) -> GovernorConfig:
        """The governor's thresholds."""
        return self.rules.governor

    # -- specs -----------------------------------------------------------------------------------
    def _make_specs(self) -> None:
        from torchrl.data import Categorical, Composite, Unbounded

        N = self.num_envs
        self.observation_spec = self.observer.spec(N, len(self.draws))
        self.action_spec = Categorical(self.action_space.n, shape=(N,), dtype=torch.int64)
        self.reward_spec = Unbounded(shape=(N, 1), dtype=torch.float32)
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
        derive from that run seed (`esper_fn.episode.Streams.of`)."""
        self._seed = 0 if seed is None else int(seed)
        self._episodes_played = [0] * self.num_envs

    def run_seed(self, row: int) -> int:
        """The run seed of row `row`'s current episode (``esper-fn grow --seed`` reproduces it)."""
        self.episode(row)
        return self._run_seeds[row]

    # -- rows ------------------------------------------------------------------------------------
    def episode(self, i: int) -> Episode:
        """Row i's episode record (state, metrics, counts, ...)."""
        ep = self._episodes[i]
        if ep is None:
            raise EnvStateError(f"row {i} has not been reset yet; call env.reset() first.")
        return ep

    def state(self, row: int) -> ef.State:
        """The current training state of a row (for evaluation outside the env, e.g. on the test split)."""
        return self.episode(row).state

    def context(self, row: int) -> Context:
        """The context (or instance: its name, the row's task and host) a row trains in its current episode."""
        ep = self.episode(row)
        if self.contexts:
            return self.contexts[self._context[row]]
        return Context(self.instances[self._context[row]].name, ep.task, ep.state.host)

    def instance(self, row: int) -> Instance:
        """The instance a row plays in its current episode.

        Raises:
            EnvStateError: the env draws contexts, not instances.
        """
        self.episode(row)
        if not self.instances:
            raise EnvStateError("this env draws (task, host) contexts, not instances (MorphogenesisEnv(instances=...)).")
        return self.instances[self._context[row]]

    @property
    def draws(self) -> tuple[str, ...]:
        """What a row can draw at reset: the names of the contexts, or of the instances."""
        return tuple(c.name for c in self.contexts) or tuple(i.name for i in self.instances)

    def _instance_task(self, inst: Instance, seed: int) -> Task:
        key = (inst.task, seed, inst.train_subset)
        task = self._tasks.get(key)
        if task is None:
            if len(self._tasks) >= 256:  # bounded: a long run enumerates many seeds
                self._tasks.pop(next(iter(self._tasks)))
            task = load(inst.task, seed=seed, device=self.device)
            if inst.train_subset is not None:
                task = _subset(task, {"train": inst.train_subset})
            self._tasks[key] = task
        return task

    def _instance_host(self, inst: Instance, task: Task) -> Host:
        key = (inst.host, tuple(task.input_shape), task.n_classes)
        if key not in self._hosts:
            self._hosts[key] = ef.hosts.preset(inst.host, input_shape=task.input_shape, n_classes=task.n_classes)
        return self._hosts[key]

    def _reset_row(self, i: int) -> None:
        k = self._episodes_played[i]
        self._episodes_played[i] += 1
        run_seed = self._seed + i + k * self.num_envs
        n = len(self.draws)
        c = 0 if n == 1 else int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(_mix(run_seed))))
        if self.contexts:
            ctx = self.contexts[c]
            ep = start(ctx.task, ctx.host, seed=run_seed, optimizer=self.optimizer, max_epochs=self.max_epochs,
                       run_id=f"env-{run_seed}")
            if self.max_param_ratio is not None:
                ep = replace(ep, param_budget=math.floor(self.max_param_ratio * ep.params0))
        else:  # an instance: its data (split by the run seed, as esper-fn grow), host, horizon, budget, lr
            inst = self.instances[c]
            task = self._instance_task(inst, run_seed)
            if inst.lr not in self._optimizers:
                self._optimizers[inst.lr] = ef.optim.adam(inst.lr)
            ep = start(task, self._instance_host(inst, task), seed=run_seed, optimizer=self._optimizers[inst.lr],
                       max_epochs=inst.epochs, preinstall=inst.preinstall, run_id=f"env-{inst.name}-{run_seed}")
            ep = replace(ep, param_budget=inst.param_budget(ep.params0))
        self._episodes[i], self._context[i], self._run_seeds[i] = ep, c, run_seed

    def _observe(self) -> TensorDictBase:
        out = self.observer([self.episode(i) for i in range(self.num_envs)], self._context)
        self._mask = out["action_mask"].clone()  # on the CPU: `_check` reads it
        out = out.to(self.device)
        self.action_spec.update_mask(out["action_mask"].clone())
        return out

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        reset = None
        if tensordict is not None and "_reset" in tensordict.keys():
            reset = tensordict.get("_reset").reshape(self.num_envs).tolist()
        for i in range(self.num_envs):
            if reset is None or reset[i] or self._episodes[i] is None:
                self._reset_row(i)
        out = self._observe()
        false = torch.zeros(self.num_envs, 1, dtype=torch.bool, device=self.device)
        out.update({"done": false, "terminated": false.clone(), "truncated": false.clone()})
        return out

    # -- the step --------------------------------------------------------------------------------
    def _check(self, i: int, index: int) -> None:
        """Raise `IllegalActionError` unless `index` is in row i's current mask."""
        if 0 <= index < self.action_space.n and self._mask[i, index]:
            return
        a, state = self.action_space, self.state(i)
        legal = self._mask[i].nonzero().flatten().tolist()
        what = a.describe(index, state.slot_names) if 0 <= index < a.n else f"outside [0, {a.n})"
        raise IllegalActionError(
            f"row {i}: action {index} ({what}) is masked out (stage of the slots: "
            f"{ {n: s.name for n, s in state.stages().items()} }, lifecycle={self.lifecycle!r}); "
            f"{len(legal)} actions are legal now, e.g. {[a.describe(j, state.slot_names) for j in legal[:4]]}. "
            "Sample from observation['action_mask'] (torchrl.modules.MaskedCategorical); with no policy (rand_action, "
            "rollout, check_env_specs) put torchrl.envs.ActionMask() on the outermost env: inside a SerialEnv or "
            "ParallelEnv it masks only its own copy of the action spec.")

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        actions = tensordict.get("action").reshape(self.num_envs).tolist()
        N = self.num_envs
        episodes = [self.episode(i) for i in range(N)]
        for i, ep in enumerate(episodes):  # every check before any change: a refused step changes nothing
            if ep.done:
                raise EnvStateError(f"row {i} finished its episode; reset it before stepping (TorchRL does so "
                                    "through the '_reset' mask: use env.step_and_maybe_reset or a collector).")
            self._check(i, actions[i])
        decisions = []
        for ep, index in zip(episodes, actions):
            a = to_action(self.action_space, index, ep.state.slot_names, curve=self.curve,
                          reason="pruned by the policy")
            decisions.append([] if a is None else [a])
        with torch.enable_grad():  # collectors and rollouts step under no_grad; training a host needs autograd
            new, events = step(episodes, decisions, self.rules)
        self._episodes = list(new)
        t = lambda v, dt=torch.float32: torch.tensor(v, dtype=dt)  # noqa: E731  (CPU: the reward's inputs)
        failed = [ep.stopped is not None for ep in new]
        budget = [ep.epoch >= ep.max_epochs for ep in new]
        done = [f or b for f, b in zip(failed, budget)]
        terminated = [f or (b and self.terminal_at_budget) for f, b in zip(failed, budget)]
        fossil = [sum(e.contribution or 0.0 for e in ev if isinstance(e, Fossilized)) for ev in events]
        reward = self.reward_fn(RewardInputs(
            val_accuracy=t([ep.metrics["val_accuracy"] for ep in new]),
            prev_val_accuracy=t([ep.metrics["val_accuracy"] for ep in episodes]),
            param_ratio=t([ep.state.num_params() / ep.params0 for ep in new]),
            prev_param_ratio=t([ep.state.num_params() / ep.params0 for ep in episodes]),
            fossilized_contribution=t(fossil), rolled_back=t([ep.rolled_back for ep in new], torch.bool),
            failed=t(failed, torch.bool), done=t(done, torch.bool)))
        out = self._observe()
        dev = self.device
        out.set("reward", reward.to(torch.float32).reshape(N, 1).to(dev))
        out.set("done", t(done, torch.bool).reshape(N, 1).to(dev))
        out.set("terminated", t(terminated, torch.bool).reshape(N, 1).to(dev))
        out.set("truncated", t(budget, torch.bool).reshape(N, 1).to(dev))
        return out

    # -- snapshots -------------------------------------------------------------------------------
    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Every row's episode mid-flight, and the seeding state, as named tensors and JSON metadata
        (`esper_fn.checkpoint.CheckpointManager.save(step, *env.snapshot())` writes them atomically).

        The env's configuration (contexts, action space, rules, reward) is not in it: `restore` into
        an env built with the same arguments.

        Raises:
            EnvStateError: a row has not been reset yet.
        """
        tensors: dict[str, torch.Tensor] = {}
        rows = []
        for i in range(self.num_envs):
            t, meta = episode_to_tensors(self.episode(i))
            tensors.update({f"row{i}/{k}": v for k, v in t.items()})
            rows.append(meta)
        meta = {"format": "esper_fn.env/1", "num_envs": self.num_envs, "contexts": list(self.draws),
                "actions": self.action_space.n, "seed": self._seed, "episodes_played": list(self._episodes_played),
                "context": list(self._context), "run_seeds": list(self._run_seeds), "rows": rows}
        return tensors, meta

    def restore(self, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> TensorDictBase:
        """Put back the rows and seeding state of a `snapshot`; returns the observation, so stepping
        can go on where the snapshot was taken (bit-identically) or branch from it.

        Raises:
            EnvStateError: the snapshot is of another env configuration (rows, contexts, actions).
        """
        mine = {"num_envs": self.num_envs, "contexts": list(self.draws), "actions": self.action_space.n}
        theirs = {k: meta.get(k) for k in mine}
        if meta.get("format") != "esper_fn.env/1" or theirs != mine:
            raise EnvStateError(f"the snapshot is of another env ({theirs}); this one is {mine}. Build the env with "
                                "the arguments of the one that took the snapshot.")
        episodes = []
        for i, row in enumerate(meta["rows"]):
            prefix = f"row{i}/"
            c = meta["context"][i]
            if self.contexts:
                task, host = self.contexts[c].task, self.contexts[c].host
            else:
                inst = self.instances[c]
                task = self._instance_task(inst, meta["run_seeds"][i])
                host = self._instance_host(inst, task)
            episodes.append(episode_from_tensors(task, host, {k[len(prefix):]: v for k, v in tensors.items()
                                                              if k.startswith(prefix)}, row))
        self._episodes = episodes
        self._seed, self._episodes_played = meta["seed"], list(meta["episodes_played"])
        self._context, self._run_seeds = list(meta["context"]), list(meta["run_seeds"])
        return self._observe()

    def describe_action(self, row: int, index: int) -> str:
        """A readable form of an action for a row, with its slot names."""
        return self.action_space.describe(index, self.state(row).slot_names)

    def __repr__(self) -> str:
        return (f"MorphogenesisEnv({'contexts' if self.contexts else 'instances'}={list(self.draws)}, num_envs={self.num_envs}, "
                f"max_epochs={self.max_epochs}, lifecycle={self.lifecycle!r}, actions={self.action_space.n})")
