"""The growth benchmark's instances and suites (`growthbench-v1`).

An `Instance` is one growth problem: a task (real data that ships inside wheels), a host built for
it, a parameter budget, a horizon in epochs and a learning rate. A `Suite` is a versioned list of
instances split into **train** instances (for tuning controllers and choosing the best fixed policy)
and **test** instances (tasks, hosts and budgets the train split does not have), with the one action
space every instance shares (slot positions, blueprints, tempos), so a controller trained on one
split runs on the other.

An instance runs through the growth environment (`esper_fn.envs.MorphogenesisEnv(instances=...)`,
each row drawing its instance at reset) and through ``esper-fn grow`` (`Instance.run_config`): the
same seed gives the same episode in both (the same growth step, `esper_fn.episode.step`). Which
decision is best differs between instances; docs/bench.md has the protocol, the comparators and the
measured headroom.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ._errors import ConfigError

__all__ = ["SUITES", "Instance", "Suite", "suite"]


class Instance(BaseModel):
    """One growth problem.

    Attributes:
        name: unique within its suite.
        split: "train" or "test".
        task: an `esper_fn.tasks.load` name (the run seed chooses its splits, as ``esper-fn grow``).
        host: an `esper_fn.hosts.preset` name (any width of the width families, e.g. "mlp-w6").
        epochs: the horizon.
        budget_ratio: the parameter budget is ``floor(budget_ratio x`` the host's parameters``)``;
            None: no budget.
        lr: Adam learning rate (host and seeds).
        train_subset: keep only the first N training samples (a tiny-data instance), or None.
        preinstall: ``[(slot, blueprint), ...]`` grafted at alpha 1 before epoch 1 with standard
            layer init (`esper_fn.episode.start`): a grown architecture trained from scratch (the
            benchmark's "capacity" comparator builds such variants).
        deficit: what the host lacks for this task, in words (documentation; no decision reads it).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    split: Literal["train", "test"]
    task: str
    host: str
    epochs: int = Field(ge=1)
    budget_ratio: float | None = Field(default=1.3, gt=1)
    lr: float = Field(default=1e-2, gt=0)
    train_subset: int | None = Field(default=None, ge=2)
    preinstall: tuple[tuple[str, str], ...] = ()
    deficit: str = ""

    def param_budget(self, params0: int) -> int | None:
        """The budget of an episode whose host has `params0` parameters."""
        return None if self.budget_ratio is None else math.floor(self.budget_ratio * params0)

    def run_config(self, seed: int, controller: str = "heuristic"):
        """The ``esper-fn grow`` config of this instance on run seed `seed` (`esper_fn.run.RunConfig`).

        Raises:
            ConfigError: a tiny-data instance (``train_subset``), which ``esper-fn grow`` cannot express.
        """
        from .run import RunConfig

        if self.train_subset is not None:
            raise ConfigError(f"instance {self.name!r} trains on the first {self.train_subset} samples only; esper-fn "
                              "grow has no such option: run it through the env (esper-fn bench run).")
        return RunConfig(task=self.task, host=self.host, controller=controller, epochs=self.epochs, seed=seed,
                         lr=self.lr, param_budget_ratio=self.budget_ratio, param_budget=None,
                         preinstall=[list(p) for p in self.preinstall])


class Suite(BaseModel):
    """A versioned set of instances and the action space they share.

    Attributes:
        name: e.g. "growthbench-v1".
        instances: train and test instances (names unique).
        blueprints: the blueprints every instance offers (the action space's B).
        tempos: the blending tempos (T).
        num_slots: slot positions of the action space (S: the most slots of any instance's host).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    instances: tuple[Instance, ...]
    blueprints: tuple[str, ...]
    tempos: tuple[int, ...] = (3, 5)
    num_slots: int = Field(ge=1)

    @field_validator("instances")
    @classmethod
    def _unique(cls, v: tuple[Instance, ...]) -> tuple[Instance, ...]:
        names = [i.name for i in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"instance names must be unique, {dup} repeat")
        return v

    def split(self, which: str | None) -> tuple[Instance, ...]:
        """The instances of a split ("train", "test"), or all of them for None.

        Raises:
            ConfigError: an unknown split.
        """
        if which is None:
            return self.instances
        if which not in ("train", "test"):
            raise ConfigError(f"split must be 'train' or 'test', got {which!r}.")
        return tuple(i for i in self.instances if i.split == which)

    def instance(self, name: str) -> Instance:
        """The instance called `name`.

        Raises:
            ConfigError: no such instance (listing them).
        """
        for i in self.instances:
            if i.name == name:
                return i
        raise ConfigError(f"suite {self.name!r} has no instance {name!r}; it has {[i.name for i in self.instances]}.")

    @property
    def horizon(self) -> int:
        """The longest instance's epochs."""
        return max(i.epochs for i in self.instances)


_BLUEPRINTS = ("conv1d_k5@1.0.0", "conv1d_k3@1.0.0", "conv2d_k3@1.0.0", "mlp_gelu@1.0.0", "mlp_gelu_x0_5@1.0.0",
               "lora_r8@1.0.0", "lora_r4@1.0.0", "rmsnorm@1.0.0")

GROWTHBENCH_V1 = Suite(
    name="growthbench-v1",
    blueprints=_BLUEPRINTS,
    num_slots=4,
    instances=(
        Instance(name="mnist1d-mlp16", split="train", task="mnist1d", host="mlp-w16", epochs=30,
                 deficit="an MLP on a raw signal: no locality prior (an input conv supplies one)"),
        Instance(name="digits-mlp4", split="train", task="digits", host="mlp-w4", epochs=30, budget_ratio=1.6,
                 deficit="a width bottleneck of 4 hidden units"),
        Instance(name="moons-mlp2", split="train", task="moons", host="mlp-w2", epochs=30, budget_ratio=4.0,
                 deficit="2 hidden units for a curved boundary in 2 dimensions"),
        Instance(name="italypower-mlp8", split="train", task="italypower", host="mlp-w8", epochs=30,
                 deficit="none: 54 training series; growth has little to add"),
        Instance(name="gunpoint-cnn4", split="train", task="gunpoint", host="cnn1d-w4", epochs=30, budget_ratio=1.5,
                 deficit="few channels, no normalisation"),
        Instance(name="basicmotions-mlp4", split="train", task="basicmotions", host="mlp-w4", epochs=30,
                 budget_ratio=1.5, deficit="an MLP on a raw 6-channel series, and 4 hidden units"),
        Instance(name="spirals-mlp4", split="test", task="spirals", host="mlp-w4", epochs=30, budget_ratio=4.0,
                 deficit="4 hidden units for two interleaved spirals; an input conv has nothing to convolve"),
        Instance(name="moons-mlp3-60", split="test", task="moons", host="mlp-w3", epochs=60, budget_ratio=3.0,
                 deficit="3 hidden units for a curved boundary, over a longer horizon"),
        Instance(name="digits-mlp3", split="test", task="digits", host="mlp-w3", epochs=30, budget_ratio=2.0,
                 deficit="a width bottleneck of 3 hidden units"),
        Instance(name="gunpoint-mlp8", split="test", task="gunpoint", host="mlp-w8", epochs=30,
                 deficit="an MLP on a raw signal, 40 training series"),
        Instance(name="mnist1d-cnn-shallow4", split="test", task="mnist1d", host="cnn1d-shallow-w4", epochs=30,
                 budget_ratio=1.5, deficit="one conv layer of 4 channels: too little depth"),
        Instance(name="italypower-cnn4", split="test", task="italypower", host="cnn1d-w4", epochs=20,
                 deficit="none it can fix: 54 training series, and a budget with room for no seed"),
    ),
)

SUITES: dict[str, Suite] = {GROWTHBENCH_V1.name: GROWTHBENCH_V1}
"""The registered suites by name."""


def suite(name: str) -> Suite:
    """A registered suite.

    Raises:
        ConfigError: an unknown name (listing the suites).
    """
    if name not in SUITES:
        raise ConfigError(f"unknown suite {name!r}; the suites are {sorted(SUITES)}.")
    return SUITES[name]


def instances_named(s: Suite, names: Sequence[str]) -> tuple[Instance, ...]:
    """The instances of `s` with these names, in that order."""
    return tuple(s.instance(n) for n in names)
