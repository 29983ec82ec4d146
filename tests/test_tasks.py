"""Tests for esper_fn.tasks: shapes, determinism, disjoint splits, batching, errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from esper_fn._errors import EsperError, TaskError
from esper_fn.tasks import TASK_NAMES, Task, load

EXPECTED = {
    # name: (input_shape, n_classes, (n_train, n_val, n_test)) at val_fraction=0.2
    "mnist1d": ((40,), 10, (3000, 1000, 1000)),
    "mnist1d-seq": ((40, 1), 10, (3000, 1000, 1000)),
    "digits": ((64,), 10, (1079, 359, 359)),
    "spirals": ((2,), 2, (1200, 400, 400)),
}


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.reshape(x.shape[0], -1)}


def _all_tensors(task: Task) -> list[torch.Tensor]:
    return [task.x_train, task.y_train, task.x_val, task.y_val, task.x_test, task.y_test]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_shapes_dtypes_and_classes(name: str) -> None:
    shape, n_classes, sizes = EXPECTED[name]
    task = load(name)
    assert task.name == name
    assert task.input_shape == shape
    assert task.n_classes == n_classes
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        x, y = task.split(split)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape) == (n, *shape)
        assert tuple(y.shape) == (n,)
        assert torch.isfinite(x).all()
    # every class occurs in training data, and labels are in range
    assert set(task.y_train.tolist()) == set(range(n_classes))
    assert int(task.y_test.max()) < n_classes and int(task.y_test.min()) >= 0


def test_digits_scaled_to_unit_interval() -> None:
    task = load("digits")
    for x in (task.x_train, task.x_val, task.x_test):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_mnist1d_is_the_standard_data_set() -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()
    ref = make_dataset(get_dataset_args())  # default args: seed 42, 4000 / 1000
    np.random.set_state(state)
    task = load("mnist1d")
    torch.testing.assert_close(task.x_test, torch.tensor(ref["x_test"], dtype=torch.float32), rtol=0, atol=0)
    assert torch.equal(task.y_test, torch.tensor(ref["y_test"]))
    pool = torch.cat([task.x_train, task.x_val])
    assert _rows(pool) == _rows(torch.tensor(ref["x"], dtype=torch.float32))
    seq = load("mnist1d-seq")
    assert torch.equal(seq.x_train.squeeze(-1), task.x_train)
    assert torch.equal(seq.x_test.squeeze(-1), task.x_test)


def test_mnist1d_leaves_global_rngs_untouched() -> None:
    from esper_fn import tasks

    tasks._mnist1d_arrays.cache_clear()  # force a real generation
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(3), random.random()
    np.random.seed(123)
    random.seed(123)
    load("mnist1d")
    assert np.array_equal(np.random.rand(3), expected_np)
    assert random.random() == expected_py


@pytest.mark.parametrize("name", TASK_NAMES)
def test_same_seed_gives_identical_tensors(name: str) -> None:
    a, b = load(name, seed=3), load(name, seed=3)
    for ta, tb in zip(_all_tensors(a), _all_tensors(b), strict=True):
        assert torch.equal(ta, tb)
        assert ta.data_ptr() != tb.data_ptr()  # fresh copies, not shared buffers


@pytest.mark.parametrize("name", TASK_NAMES)
def test_different_seed_gives_different_split(name: str) -> None:
    a, b = load(name, seed=0), load(name, seed=1)
    assert not torch.equal(a.x_val, b.x_val)
    assert not torch.equal(a.x_train, b.x_train)
    if name.startswith("mnist1d"):
        # the standard protocol fixes test and the train+val pool; only the val carve-out moves
        assert torch.equal(a.x_test, b.x_test)
        assert _rows(torch.cat([a.x_train, a.x_val])) == _rows(torch.cat([b.x_train, b.x_val]))
    else:
        assert not torch.equal(a.x_test, b.x_test)


@pytest.mark.parametrize("name", TASK_NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_splits_are_disjoint(name: str, seed: int) -> None:
    # every row of these data sets is unique, so disjoint row sets mean disjoint indices
    task = load(name, seed=seed)
    train, val, test = _rows(task.x_train), _rows(task.x_val), _rows(task.x_test)
    n_rows = task.x_train.shape[0] + task.x_val.shape[0] + task.x_test.shape[0]
    assert len(train) + len(val) + len(test) == n_rows
    assert not train & val and not train & test and not val & test


def test_splits_partition_the_data_set() -> None:
    # the three splits together are exactly the original data set (rows are unique in digits)
    from sklearn.datasets import load_digits

    task = load("digits", seed=5)
    raw = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    parts = [task.x_train, task.x_val, task.x_test]
    assert sum(p.shape[0] for p in parts) == raw.shape[0]
    assert _rows(torch.cat(parts)) == _rows(raw)


def test_val_fraction_changes_sizes() -> None:
    task = load("spirals", val_fraction=0.1)
    assert (task.x_train.shape[0], task.x_val.shape[0], task.x_test.shape[0]) == (1400, 200, 400)
    task = load("mnist1d", val_fraction=0.05)
    assert (task.x_train.shape[0], task.x_val.shape[0]) == (3750, 250)


def test_load_returns_independent_copies() -> None:
    a = load("digits")
    a.x_train.zero_()
    assert float(load("digits").x_train.max()) == 1.0


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("batch_size", [1, 7, 400, 1000])
def test_batches_cover_each_sample_once(batch_size: int, drop_last: bool) -> None:
    task = load("spirals")
    x_val, y_val = task.x_val, task.y_val
    gen = torch.Generator().manual_seed(0)
    got = list(task.batches("val", batch_size, generator=gen, drop_last=drop_last))
    assert len(got) == task.num_batches("val", batch_size, drop_last=drop_last)
    sizes = [xb.shape[0] for xb, _ in got]
    assert all(s == batch_size for s in sizes[:-1])
    n = x_val.shape[0]
    assert sum(sizes) == (n - n % batch_size if drop_last else n)
    if not got:  # drop_last with a batch larger than the split: nothing to check
        assert drop_last and batch_size > n
        return
    xs = torch.cat([xb for xb, _ in got])
    ys = torch.cat([yb for _, yb in got])
    # map each batched row back to its index in the split: a permutation (subset with drop_last)
    index = {row.numpy().tobytes(): i for i, row in enumerate(x_val)}
    idx = [index[row.numpy().tobytes()] for row in xs]
    assert len(set(idx)) == len(idx)
    assert torch.equal(ys, y_val[idx])  # labels stay paired with their samples


def test_batches_follow_the_generator() -> None:
    task = load("spirals")

    def epoch(gen: torch.Generator) -> torch.Tensor:
        return torch.cat([xb for xb, _ in task.batches("train", 64, generator=gen)])

    a = epoch(torch.Generator().manual_seed(7))
    b = epoch(torch.Generator().manual_seed(7))
    c = epoch(torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # exactly one randperm of N per call: the same order as drawing it by hand
    perm = torch.randperm(task.x_train.shape[0], generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, task.x_train[perm])
    # two epochs from one generator differ (the generator advances), and are each a permutation
    gen = torch.Generator().manual_seed(7)
    e1, e2 = epoch(gen), epoch(gen)
    assert torch.equal(e1, a) and not torch.equal(e1, e2)


def test_batches_without_shuffle_keep_order_and_do_not_alias() -> None:
    task = load("spirals")
    xs = [xb for xb, _ in task.batches("test", 128, generator=None, shuffle=False)]
    assert torch.equal(torch.cat(xs), task.x_test)
    before = task.x_test.clone()
    xs[0].zero_()
    for xb, _ in task.batches("test", 128, generator=torch.Generator().manual_seed(0)):
        xb.zero_()
    assert torch.equal(task.x_test, before)


def test_num_batches() -> None:
    task = load("spirals")  # 1200 / 400 / 400
    assert task.num_batches("train", 100) == 12
    assert task.num_batches("val", 300) == 2
    assert task.num_batches("val", 300, drop_last=True) == 1
    assert task.num_batches("test", 1000) == 1
    assert task.num_batches("test", 1000, drop_last=True) == 0


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(TaskError, match=r"unknown task 'mnist'.*'mnist1d'.*'digits'.*'spirals'"):
        load("mnist")


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 0.8, 1.0, 1.5, float("nan"), "0.2", True, None])
def test_bad_val_fraction(bad: object) -> None:
    with pytest.raises(TaskError, match="val_fraction"):
        load("spirals", val_fraction=bad)  # type: ignore[arg-type]


def test_val_fraction_too_small_for_data() -> None:
    with pytest.raises(TaskError, match="0 validation"):
        load("digits", val_fraction=1e-4)


def test_errors_are_value_errors_and_esper_errors() -> None:
    with pytest.raises(ValueError):
        load("nope")
    with pytest.raises(EsperError):
        load("spirals", seed=1.5)  # type: ignore[arg-type]


def test_batch_errors() -> None:
    task = load("spirals")
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(TaskError, match="unknown split 'valid'"):
        task.batches("valid", 10, generator=gen)  # type: ignore[arg-type]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(TaskError, match="batch_size"):
            task.batches("train", bad, generator=gen)  # type: ignore[arg-type]
        with pytest.raises(TaskError, match="batch_size"):
            task.num_batches("train", bad)  # type: ignore[arg-type]
    with pytest.raises(TaskError, match="needs a torch.Generator"):
        task.batches("train", 10, generator=None)
    with pytest.raises(TaskError, match="needs a torch.Generator"):
        task.batches("train", 10, generator=0)  # type: ignore[arg-type]


def test_task_validates_its_tensors() -> None:
    x = torch.zeros(4, 3)
    y = torch.zeros(4, dtype=torch.int64)
    good = dict(
        name="t", x_train=x, y_train=y, x_val=x, y_val=y, x_test=x, y_test=y, n_classes=2, input_shape=(3,)
    )
    Task(**good)  # type: ignore[arg-type]
    cases = [
        ({"x_val": x.double()}, "x must be float32"),
        ({"y_test": y.int()}, "y must be int64"),
        ({"input_shape": (4,)}, r"input_shape is \(4,\)"),
        ({"y_train": torch.zeros(3, dtype=torch.int64)}, "y must be"),
        ({"y_val": torch.tensor([0, 1, 2, 0])}, r"labels span \[0, 2\], outside \[0, 2\)"),
        ({"n_classes": 0}, "n_classes"),
        ({"x_test": x.numpy()}, "must be torch.Tensor"),
    ]
    for change, msg in cases:
        with pytest.raises(TaskError, match=msg):
            Task(**{**good, **change})  # type: ignore[arg-type]


# --- host presets built for a task's shapes --------------------------------------------------

# (task, preset) pairs that cannot be adapted: the task's samples do not fit the host family.
MISFITS = {
    ("spirals", "cnn-impaired"), ("spirals", "cnn-paper"),  # 2 features: too short for the conv stack
    ("mnist1d-seq", "mlp-impaired"), ("mnist1d-seq", "mlp-impaired-deep"), ("mnist1d-seq", "mlp-paper"),
    ("mnist1d-seq", "cnn-impaired"), ("mnist1d-seq", "cnn-paper"),  # [40, 1] sequences on flat-vector hosts
}  # fmt: skip


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_preset_fits_the_task_or_says_why(name: str) -> None:
    import esper_fn as ef

    task = load(name)
    for preset in ef.hosts.hosts():
        if (name, preset) in MISFITS:
            with pytest.raises(ef.HostError) as err:
                ef.hosts.preset(preset, input_shape=task.input_shape, n_classes=task.n_classes)
            msg = str(err.value)
            assert preset in msg and str(task.input_shape) in msg and "(40,)" in msg
            continue
        host = ef.hosts.preset(preset, input_shape=task.input_shape, n_classes=task.n_classes)
        state = ef.init(host, generator=torch.Generator().manual_seed(0))
        x, y = task.x_train[:8], task.y_train[:8]
        assert ef.apply(state, x).shape == (8, task.n_classes)
        new, m = ef.train_step(state, x, y)
        assert torch.isfinite(m["loss"])


def test_presets_default_to_mnist1d_and_are_introspectable() -> None:
    import esper_fn as ef

    presets = ef.hosts.hosts()
    sizes = {n: ef.init(b()).num_params() for n, b in presets.items()}
    assert sizes["mlp-impaired"] == 826 and sizes["cnn-impaired"] == 486 and sizes["mlp-paper"] == 15210
    assert sizes["cnn-paper"] == 5210
    b = presets["mlp-impaired"]
    assert b.keywords["name"] == "mlp-impaired" and "MLP" in b.func.__doc__ and b.func.__name__ == "mlp_preset"
    assert ef.hosts.preset("mlp-impaired", input_shape=(64,), n_classes=10).config["widths"] == [64, 16, 10]
    assert ef.hosts.preset("cnn-impaired", input_shape=(64,), n_classes=3).config["length"] == 64
    with pytest.raises(ef.HostError, match="unknown host preset 'mlp'.*mlp-impaired"):
        ef.hosts.preset("mlp")
