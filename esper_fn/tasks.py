"""Data sets as tensors: small, offline, deterministic classification tasks.

A `Task` holds all of its splits in memory as plain tensors (x float32, y int64) and hands out
mini-batches with one `torch.randperm` per epoch and tensor indexing, so an epoch costs a single
gather and no per-sample Python work.

`load(name, seed=..., val_fraction=...)` builds one of:

* ``"mnist1d"``: MNIST-1D generated offline by the `mnist1d` package with its standard arguments
  (5000 samples, generator seed 42, 4000 train / 1000 test), x of shape [N, 40], 10 classes. The
  train and test data are fixed by that protocol and do not depend on `seed`; `seed` only chooses
  which of the 4000 standard training samples are held out for validation.
* ``"mnist1d-seq"``: the same data with x of shape [N, 40, 1] (sequence length 40, one channel), for
  sequence models.
* ``"digits"``: scikit-learn's 8x8 digits (1797 images), x of shape [N, 64] scaled to [0, 1],
  10 classes. `seed` chooses the split.
* ``"spirals"``: two interleaved noisy spirals, 2000 points, x of shape [N, 2], 2 classes. `seed`
  generates the points (with a `torch.Generator`) and chooses the split.

Split sizes. `val_fraction` is the fraction of *all* samples of the task that goes to validation,
and every task keeps 20% of its samples for test, so the default ``val_fraction=0.2`` gives a
60/20/20 train/val/test split everywhere (mnist1d: 3000/1000/1000; digits: 1079/359/359;
spirals: 1200/400/400). For MNIST-1D the test split is the standard one and validation is carved out
of the standard training split.
"""

from __future__ import annotations

import functools
import math
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ._errors import TaskError

__all__ = ["TASK_NAMES", "Split", "Task", "load"]

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
TASK_NAMES: tuple[str, ...] = ("mnist1d", "mnist1d-seq", "digits", "spirals")

TEST_FRACTION = 0.2
"""Fraction of every task's samples kept for test (MNIST-1D: its standard 1000 of 5000)."""

_MNIST1D_SEED = 42  # the mnist1d package's default; fixes the standard data set.
_SPIRALS_N = 2000
_SPIRALS_TURNS = 1.5
_SPIRALS_NOISE = 0.04


@dataclass(frozen=True, eq=False)
class Task:
    """A classification data set with train, validation and test splits held as tensors.

    The record is frozen, but tensors are mutable objects: treat them as read-only. Equality is
    identity (`eq=False`), because comparing tensors element-wise has no single truth value.

    Attributes:
        name: the task's name, e.g. "mnist1d".
        x_train: float32 [N_train, *input_shape].
        y_train: int64 [N_train], labels in [0, n_classes).
        x_val: float32 [N_val, *input_shape].
        y_val: int64 [N_val].
        x_test: float32 [N_test, *input_shape].
        y_test: int64 [N_test].
        n_classes: number of classes.
        input_shape: shape of one sample, e.g. (40,) or (40, 1).

    Raises:
        TaskError: on construction, if a tensor has the wrong type, dtype or shape, if x and y of a
            split differ in length, or if a label lies outside [0, n_classes).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    n_classes: int
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.n_classes, int) or isinstance(self.n_classes, bool) or self.n_classes < 1:
            raise TaskError(f"task {self.name!r}: n_classes must be a positive int, got {self.n_classes!r}.")
        shape = tuple(self.input_shape)
        for split in SPLITS:
            x = getattr(self, f"x_{split}")
            y = getattr(self, f"y_{split}")
            where = f"task {self.name!r}, split {split!r}"
            if not isinstance(x, Tensor) or not isinstance(y, Tensor):
                raise TaskError(
                    f"{where}: x and y must be torch.Tensor, got {type(x).__name__} and {type(y).__name__}."
                )
            if x.dtype != torch.float32:
                raise TaskError(f"{where}: x must be float32, got {x.dtype}. Convert with `x.float()`.")
            if y.dtype != torch.int64:
                raise TaskError(f"{where}: y must be int64, got {y.dtype}. Convert with `y.long()`.")
            if tuple(x.shape[1:]) != shape:
                raise TaskError(
                    f"{where}: x has shape {tuple(x.shape)}, but input_shape is {shape}; "
                    f"x must be [N, *input_shape]."
                )
            if y.ndim != 1 or y.shape[0] != x.shape[0]:
                raise TaskError(
                    f"{where}: y must be [N] with N = len(x) = {x.shape[0]}, got shape {tuple(y.shape)}."
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.n_classes):
                raise TaskError(
                    f"{where}: labels span [{int(y.min())}, {int(y.max())}], outside [0, {self.n_classes})."
                )

    def split(self, split: Split) -> tuple[Tensor, Tensor]:
        """The (x, y) tensors of one split.

        Args:
            split: "train", "val" or "test".

        Returns:
            x float32 [N, *input_shape] and y int64 [N] (the task's own tensors, not copies).

        Raises:
            TaskError: if `split` is not one of "train", "val", "test".
        """
        if split not in SPLITS:
            raise TaskError(f"unknown split {split!r}; valid splits are {list(SPLITS)}.")
        return getattr(self, f"x_{split}"), getattr(self, f"y_{split}")

    def num_batches(self, split: Split, batch_size: int, *, drop_last: bool = False) -> int:
        """How many batches `batches(split, batch_size, drop_last=drop_last)` yields per epoch.

        Args:
            split: "train", "val" or "test".
            batch_size: samples per batch, >= 1.
            drop_last: count only full batches.

        Returns:
            ceil(N / batch_size), or floor(N / batch_size) with `drop_last`.

        Raises:
            TaskError: on an unknown split or a batch size that is not a positive int.
        """
        x, _ = self.split(split)
        _check_batch_size(batch_size)
        n = x.shape[0]
        return n // batch_size if drop_last else math.ceil(n / batch_size)

    def batches(
        self,
        split: Split,
        batch_size: int,
        *,
        generator: torch.Generator | None,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of mini-batches over a split.

        The permutation is drawn here, when `batches` is called (one `torch.randperm(N, generator=
        generator)`), not lazily at the first `next`, so the generator advances by exactly one draw
        per call. The split is gathered once in that order, and each batch is a slice of that
        private copy: modifying a batch in place never changes the task.

        Args:
            split: "train", "val" or "test".
            batch_size: samples per batch, >= 1. The last batch is smaller when N is not a multiple.
            generator: the CPU `torch.Generator` that orders the samples. May be None only with
                ``shuffle=False``.
            shuffle: draw a random order; without it the samples come in stored order.
            drop_last: skip the final, smaller batch.

        Returns:
            An iterator of (x float32 [B, *input_shape], y int64 [B]); every sample appears exactly
            once per epoch (at most once with `drop_last`).

        Raises:
            TaskError: on an unknown split, a batch size that is not a positive int, or
                ``shuffle=True`` without a `torch.Generator`.
        """
        x, y = self.split(split)
        _check_batch_size(batch_size)
        n = x.shape[0]
        if shuffle:
            if not isinstance(generator, torch.Generator):
                raise TaskError(
                    f"batches({split!r}, shuffle=True) needs a torch.Generator to draw the order, got "
                    f"{type(generator).__name__}. Pass generator=torch.Generator().manual_seed(seed), or "
                    f"shuffle=False for a fixed order."
                )
            order = torch.randperm(n, generator=generator)
            x, y = x[order], y[order]
        else:
            x, y = x.clone(), y.clone()
        stop = n - n % batch_size if drop_last else n
        return _slices(x, y, batch_size, stop)


def _slices(x: Tensor, y: Tensor, batch_size: int, stop: int) -> Iterator[tuple[Tensor, Tensor]]:
    for start in range(0, stop, batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise TaskError(f"batch_size must be a positive int, got {batch_size!r}.")


def load(name: str, *, seed: int = 0, val_fraction: float = 0.2) -> Task:
    """Build a task by name. Same arguments, same tensors.

    Args:
        name: one of "mnist1d", "mnist1d-seq", "digits", "spirals" (see the module docstring).
        seed: chooses the validation split (and, for "digits" and "spirals", the test split; for
            "spirals", also the points). MNIST-1D's train+val and test data never depend on it.
        val_fraction: fraction of all samples of the task held out for validation, in
            (0, 1 - 0.2): 20% of every task is test. The default gives 60/20/20.

    Returns:
        A `Task` whose tensors are fresh copies: modifying them changes no other task.

    Raises:
        TaskError: on an unknown name, a `seed` that is not an int, or a `val_fraction` that leaves
            no validation or no training sample.
    """
    if name not in TASK_NAMES:
        raise TaskError(f"unknown task {name!r}; valid names are {list(TASK_NAMES)}.")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TaskError(f"seed must be an int, got {seed!r}.")
    if (
        not isinstance(val_fraction, (int, float))
        or isinstance(val_fraction, bool)
        or not 0.0 < val_fraction < 1.0 - TEST_FRACTION
    ):
        raise TaskError(
            f"val_fraction must be a number in (0, {1.0 - TEST_FRACTION:g}) (a fraction of all samples; "
            f"{TEST_FRACTION:g} of them are test), got {val_fraction!r}."
        )
    if name in ("mnist1d", "mnist1d-seq"):
        return _load_mnist1d(name, seed, float(val_fraction))
    if name == "digits":
        x, y = _digits_arrays()
        return _split_pool(name, torch.tensor(x), torch.tensor(y), 10, seed, float(val_fraction), None)
    gen = torch.Generator().manual_seed(seed)
    x, y = _spirals(_SPIRALS_N, gen)
    return _split_pool(name, x, y, 2, seed, float(val_fraction), gen)


def _n_val(name: str, n_total: int, n_pool: int, val_fraction: float) -> int:
    n_val = round(val_fraction * n_total)
    if n_val < 1 or n_val >= n_pool:
        raise TaskError(
            f"task {name!r}: val_fraction={val_fraction} of {n_total} samples gives {n_val} validation "
            f"samples out of {n_pool} train+val samples; need at least one of each. Pick a value nearer 0.2."
        )
    return n_val


def _load_mnist1d(name: str, seed: int, val_fraction: float) -> Task:
    x, y, x_test, y_test = _mnist1d_arrays()
    x_pool = torch.tensor(x, dtype=torch.float32)
    y_pool = torch.tensor(y, dtype=torch.int64)
    n_val = _n_val(name, len(y) + len(y_test), len(y), val_fraction)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    x_t = torch.tensor(x_test, dtype=torch.float32)
    if name == "mnist1d-seq":
        x_pool, x_t = x_pool.unsqueeze(-1), x_t.unsqueeze(-1)
    return Task(
        name=name,
        x_train=x_pool[train_idx],
        y_train=y_pool[train_idx],
        x_val=x_pool[val_idx],
        y_val=y_pool[val_idx],
        x_test=x_t,
        y_test=torch.tensor(y_test, dtype=torch.int64),
        n_classes=10,
        input_shape=tuple(x_pool.shape[1:]),
    )


def _split_pool(
    name: str,
    x: Tensor,
    y: Tensor,
    n_classes: int,
    seed: int,
    val_fraction: float,
    generator: torch.Generator | None,
) -> Task:
    """Shuffle all samples with `seed` and cut them into train / val / test."""
    x, y = x.to(torch.float32), y.to(torch.int64)
    n = x.shape[0]
    n_test = round(TEST_FRACTION * n)
    n_val = _n_val(name, n, n - n_test, val_fraction)
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    test_idx, val_idx, train_idx = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    return Task(
        name=name,
        x_train=x[train_idx],
        y_train=y[train_idx],
        x_val=x[val_idx],
        y_val=y[val_idx],
        x_test=x[test_idx],
        y_test=y[test_idx],
        n_classes=n_classes,
        input_shape=tuple(x.shape[1:]),
    )


_MNIST1D_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The standard MNIST-1D arrays (x [4000, 40] f64, y [4000] i64, x_test [1000, 40], y_test [1000]).

    `make_dataset` seeds and draws from numpy's *global* RNG (and seeds Python's `random`); both
    states are saved and restored so that loading a task changes no one else's random stream. The
    arrays are cached (generation takes ~2 s) and made read-only; callers copy them into tensors.
    """
    from mnist1d.data import get_dataset_args, make_dataset  # slow import (matplotlib)

    args = get_dataset_args()
    args.seed = _MNIST1D_SEED
    with _MNIST1D_LOCK:
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            data = make_dataset(args)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
    arrays = (data["x"], data["y"], data["x_test"], data["y_test"])
    for a in arrays:
        a.setflags(write=False)
    return arrays


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits: x [1797, 64] float32 in [0, 1], y [1797] int64; cached, read-only."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _spirals(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two interleaved Archimedean spirals with Gaussian noise.

    Args:
        n: total number of points (even); n // 2 per class.
        generator: source of all randomness.

    Returns:
        x float32 [n, 2] (radius up to about 1) and y int64 [n] (class 0 for the first arm, 1 for
        the arm rotated by pi), in class order; the caller shuffles.
    """
    half = n // 2
    max_angle = _SPIRALS_TURNS * 2 * math.pi
    # sqrt spreads points evenly along the arm's length rather than its angle.
    angle = torch.sqrt(torch.rand(half, generator=generator)) * max_angle + 0.5
    radius = angle / (max_angle + 0.5)
    arm = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    x = torch.cat([arm, -arm]) + _SPIRALS_NOISE * torch.randn(2 * half, 2, generator=generator)
    y = torch.cat([torch.zeros(half, dtype=torch.int64), torch.ones(half, dtype=torch.int64)])
    return x.to(torch.float32), y
