"""Tests for data/: data set loading, the in-memory loader, subsets."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import data.datasets as ds
from data import (
    DATASETS,
    InMemoryLoader,
    expected_files,
    find_data,
    load_split,
    normalize,
    random_crop_flip,
    resolve_data_root,
    take_subset,
)
from util.errors import UserError

# ---------------------------------------------------------------------------
# data set metadata


def test_dataset_info() -> None:
    assert DATASETS["MNIST"].shape == (1, 28, 28) and DATASETS["MNIST"].input_size == 784
    assert DATASETS["FashionMNIST"].train_size == 60000
    c = DATASETS["CIFAR10"]
    assert (c.in_channels, c.image_size, c.num_classes, c.train_size) == (3, 32, 10, 50000)
    assert len(c.mean) == len(c.std) == 3 and c.input_size == 3072


# ---------------------------------------------------------------------------
# real data


def test_load_mnist_train_real(data_root: Path) -> None:
    x, y = load_split("MNIST", train=True, data_root=data_root, download=False)
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (60000,) and y.dtype == torch.int64
    # per-class counts from ../shared/data/README.md
    assert y.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    # normalized with the train statistics: mean ~0, std ~1
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3
    # callers own their tensors: writing into one does not reach the next load (no timing asserted:
    # that belongs to bench/data_loading.py, not to a test on a shared machine)
    x.zero_()
    x2, _ = load_split("MNIST", train=True, data_root=data_root)
    assert x2.abs().sum() > 0


def test_load_fashion_test_real(data_root: Path) -> None:
    if not ds.has_data("FashionMNIST", data_root):
        pytest.skip("FashionMNIST not in data_root")
    x, y = load_split("FashionMNIST", train=False, data_root=data_root, download=False)
    assert x.shape == (10000, 1, 28, 28)
    assert y.bincount().tolist() == [1000] * 10
    raw = torch.tensor(
        np.fromfile(data_root / "FashionMNIST/raw/t10k-images-idx3-ubyte", dtype=np.uint8)[16:16 + 784]
    ).float()
    expect = (raw / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(x[0].flatten(), expect)


def test_mnist_test_fixture(mnist_test) -> None:
    x, y = mnist_test
    assert x.shape == (10000, 1, 28, 28) and y.bincount().sum() == 10000


# ---------------------------------------------------------------------------
# locating data


def test_resolve_order(tmp_path: Path, no_data_env: Path, datafiles, monkeypatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    datafiles.write_fake_mnist(a)
    datafiles.write_fake_mnist(b)
    datafiles.write_fake_mnist(no_data_env / "data")
    assert resolve_data_root(None, "MNIST") == Path("data")
    monkeypatch.setenv("DATA_ROOT", str(b))
    assert resolve_data_root(None, "MNIST") == b
    assert resolve_data_root(str(a), "MNIST") == a
    # an explicit root without the files falls through to the next candidate
    assert resolve_data_root(str(tmp_path / "empty"), "MNIST") == b
    assert find_data("MNIST", tmp_path / "empty") == b
    assert find_data("CIFAR10", a) is None
    # nothing anywhere: the first candidate (where a download would go)
    assert resolve_data_root(str(tmp_path / "empty"), "CIFAR10") == tmp_path / "empty"


def test_resolve_default_is_dot_data(no_data_env: Path) -> None:
    assert resolve_data_root(None) == Path("data")


def test_missing_without_download_names_files(tmp_path: Path, no_data_env: Path) -> None:
    with pytest.raises(UserError) as e:
        load_split("MNIST", True, tmp_path / "nowhere", download=False)
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw" / "train-images-idx3-ubyte") in msg
    assert "--data_root" in msg and "$DATA_ROOT" in msg
    assert "\n" not in msg


def test_missing_download_failure_is_user_error(tmp_path: Path, no_data_env: Path, monkeypatch) -> None:
    calls = []

    def offline(name: str, root: Path) -> None:
        calls.append((name, root))
        (root / name / "raw").mkdir(parents=True)  # as torchvision does before failing
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\n<urlopen error [Errno -2]>")

    monkeypatch.setattr(ds, "_download", offline)
    with pytest.raises(UserError) as e:
        load_split("FashionMNIST", False, tmp_path / "r")
    assert calls == [("FashionMNIST", tmp_path / "r")]
    msg = str(e.value)
    assert "download failed: <urlopen error [Errno -2]>" in msg and "\n" not in msg
    assert not (tmp_path / "r").exists()  # no empty folders left behind
    assert str(tmp_path / "r" / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte") in msg


def test_download_success_path(tmp_path: Path, no_data_env: Path, monkeypatch, datafiles) -> None:
    monkeypatch.setattr(ds, "_download", lambda name, root: datafiles.write_fake_mnist(root, name))
    x, y = load_split("MNIST", False, tmp_path / "dl")
    assert x.shape == (10, 1, 28, 28) and y.tolist() == list(range(10))


def test_unknown_dataset() -> None:
    with pytest.raises(UserError, match="unknown data set"):
        load_split("SVHN", True)


# ---------------------------------------------------------------------------
# corrupted files


@pytest.mark.parametrize("victim", ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
@pytest.mark.parametrize("keep", [0, 3, 9, -1])
def test_truncated_idx_names_file(tmp_path: Path, no_data_env: Path, datafiles, victim: str, keep: int) -> None:
    root = datafiles.write_fake_mnist(tmp_path)
    path = root / "MNIST" / "raw" / victim
    content = path.read_bytes()
    path.write_bytes(content[:keep])  # keep=-1: all but the last byte
    with pytest.raises(UserError) as e:
        load_split("MNIST", False, root, download=False)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_random_bytes_idx(tmp_path: Path, no_data_env: Path, datafiles) -> None:
    root = datafiles.write_fake_mnist(tmp_path)
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(os.urandom(5000))
    with pytest.raises(UserError, match="train-images-idx3-ubyte"):
        load_split("MNIST", True, root, download=False)


def test_mismatched_label_count(tmp_path: Path, no_data_env: Path, datafiles) -> None:
    root = datafiles.write_fake_mnist(tmp_path)
    datafiles.write_idx(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", np.zeros(7))
    with pytest.raises(UserError, match="7 labels for 10 images"):
        load_split("MNIST", False, root, download=False)


def test_label_out_of_range(tmp_path: Path, no_data_env: Path, datafiles) -> None:
    root = datafiles.write_fake_mnist(tmp_path)
    datafiles.write_idx(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", np.full(10, 12))
    with pytest.raises(UserError, match="outside 0..9"):
        load_split("MNIST", False, root, download=False)


# ---------------------------------------------------------------------------
# CIFAR-10 (python pickle format, written here)


def test_cifar_loads(tmp_path: Path, no_data_env: Path, datafiles) -> None:
    written = datafiles.write_fake_cifar(tmp_path, per_batch=4, n_test=6)
    x, y = load_split("CIFAR10", True, tmp_path, download=False)
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    raw, labels = written["train"]
    assert y.tolist() == labels.tolist()
    info = DATASETS["CIFAR10"]
    img = torch.tensor(raw[7].reshape(3, 32, 32)).float() / 255
    expect = (img - torch.tensor(info.mean).view(3, 1, 1)) / torch.tensor(info.std).view(3, 1, 1)
    torch.testing.assert_close(x[7], expect)
    xt, yt = load_split("CIFAR10", False, tmp_path, download=False)
    assert xt.shape == (6, 3, 32, 32) and yt.tolist() == written["test"][1].tolist()


def test_cifar_missing_names_folder(tmp_path: Path, no_data_env: Path) -> None:
    with pytest.raises(UserError) as e:
        load_split("CIFAR10", True, tmp_path, download=False)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in str(e.value)


def test_cifar_corrupted(tmp_path: Path, no_data_env: Path, datafiles) -> None:
    datafiles.write_fake_cifar(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(UserError, match="data_batch_3"):
        load_split("CIFAR10", True, tmp_path, download=False)


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("touch pwned",))


def test_cifar_pickle_cannot_run_code(tmp_path: Path, no_data_env: Path, datafiles) -> None:
    datafiles.write_fake_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": _Evil(), "labels": []}, f, protocol=2)
    with pytest.raises(UserError, match="test_batch"):
        load_split("CIFAR10", False, tmp_path, download=False)
    assert not (no_data_env / "pwned").exists()


def test_expected_files_layout(tmp_path: Path) -> None:
    assert expected_files("MNIST", tmp_path, True) == [
        tmp_path / "MNIST/raw/train-images-idx3-ubyte",
        tmp_path / "MNIST/raw/train-labels-idx1-ubyte",
    ]
    assert len(expected_files("CIFAR10", tmp_path)) == 6


def test_normalize_matches_formula() -> None:
    img = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    info = DATASETS["CIFAR10"]
    expect = (img.float() / 255 - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(img, "CIFAR10"), expect)


# ---------------------------------------------------------------------------
# InMemoryLoader


def _toy(n: int = 23, c: int = 1, s: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, c, s, s).contiguous()
    return x, torch.arange(n)


def test_loader_covers_epoch_once() -> None:
    x, y = _toy(23)
    loader = InMemoryLoader(x, y, batch_size=5, seed=3)
    assert len(loader) == 5
    batches = list(loader)
    assert [b[1].shape[0] for b in batches] == [5, 5, 5, 5, 3]
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(23))
    for bx, by in batches:  # images stay paired with their labels
        assert torch.equal(bx[:, 0, 0, 0].long(), by)


def test_loader_order_is_randperm_of_seed_plus_epoch() -> None:
    x, y = _toy(50)
    loader = InMemoryLoader(x, y, batch_size=7, seed=11)
    loader.set_epoch(4)
    order = torch.cat([b[1] for b in loader])
    assert torch.equal(order, torch.randperm(50, generator=torch.Generator().manual_seed(15)))
    # iterating again without set_epoch repeats the epoch; another epoch differs
    assert torch.equal(torch.cat([b[1] for b in loader]), order)
    loader.set_epoch(5)
    assert not torch.equal(torch.cat([b[1] for b in loader]), order)


def test_loader_resume_reproduces_batches() -> None:
    x, y = _toy(40, c=3, s=8)
    a = InMemoryLoader(x, y, batch_size=6, seed=2, augment=True)
    for epoch in range(3):
        a.set_epoch(epoch)
        ref = [(bx.clone(), by.clone()) for bx, by in a]
    b = InMemoryLoader(x, y, batch_size=6, seed=2, augment=True)  # "resumed" process
    b.set_epoch(2)
    for (rx, ry), (bx, by) in zip(ref, b, strict=True):
        assert torch.equal(rx, bx) and torch.equal(ry, by)


def test_loader_no_shuffle_and_drop_last() -> None:
    x, y = _toy(23)
    loader = InMemoryLoader(x, y, batch_size=5, shuffle=False, drop_last=True)
    assert len(loader) == 4
    assert torch.equal(torch.cat([b[1] for b in loader]), torch.arange(20))


def test_loader_sharding_pads_like_distributed_sampler() -> None:
    x, y = _toy(10)
    loaders = [InMemoryLoader(x, y, batch_size=3, seed=0, rank=r, world_size=3) for r in range(3)]
    shards = [torch.cat([b[1] for b in ld]) for ld in loaders]
    assert [len(ld) for ld in loaders] == [2, 2, 2]
    assert [s.numel() for s in shards] == [4, 4, 4]
    allidx = torch.cat(shards)
    assert set(allidx.tolist()) == set(range(10))
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    padded = torch.cat([perm, perm[:2]])
    for r in range(3):
        assert torch.equal(shards[r], padded[r::3])


def test_loader_sharding_drop_last_is_disjoint() -> None:
    x, y = _toy(10)
    shards = [
        torch.cat([b[1] for b in InMemoryLoader(x, y, batch_size=3, rank=r, world_size=3, drop_last=True)])
        for r in range(3)
    ]
    assert [s.numel() for s in shards] == [3, 3, 3]
    flat = torch.cat(shards).tolist()
    assert len(set(flat)) == 9


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), bs=st.integers(1, 17), ws=st.integers(1, 4), drop=st.booleans(), seed=st.integers(0, 9))
def test_loader_invariants(n: int, bs: int, ws: int, drop: bool, seed: int) -> None:
    x, y = _toy(n, s=1)
    if drop and n < ws:
        return
    loaders = [InMemoryLoader(x, y, bs, seed=seed, drop_last=drop, rank=r, world_size=ws) for r in range(ws)]
    lens = {len(ld) for ld in loaders}
    assert len(lens) == 1  # every rank runs the same number of steps
    counts = []
    for ld in loaders:
        batches = list(ld)
        assert len(batches) == len(ld)
        assert all(b[1].shape[0] == bs for b in batches[:-1])
        if drop and batches:
            assert batches[-1][1].shape[0] == bs
        counts.append(sum(b[1].shape[0] for b in batches))
    seen = torch.cat([b[1] for ld in loaders for b in ld]) if any(counts) else torch.zeros(0, dtype=torch.long)
    if drop:  # each rank: floor(n / ws) examples, then only whole batches; no example twice
        assert counts == [(n // ws) // bs * bs] * ws
        assert len(set(seen.tolist())) == seen.numel()
    else:  # each rank: ceil(n / ws) examples (padded by wrapping round), every example at least once
        assert counts == [-(-n // ws)] * ws
        assert set(seen.tolist()) == set(range(n))


def _reference_crop_flip(img: torch.Tensor, dy: int, dx: int, flip: bool, pad: int = 4) -> torch.Tensor:
    c, h, w = img.shape
    padded = torch.zeros(c, h + 2 * pad, w + 2 * pad)
    padded[:, pad:pad + h, pad:pad + w] = img
    out = padded[:, dy:dy + h, dx:dx + w]
    return out.flip(-1) if flip else out


def test_random_crop_flip_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 8, 8, generator=g)
    offsets = torch.tensor([[0, 0], [8, 8], [4, 4], [1, 7], [6, 2], [4, 4]])
    flips = torch.tensor([False, True, False, True, False, True])
    out = random_crop_flip(x, offsets, flips)
    for b in range(6):
        ref = _reference_crop_flip(x[b], int(offsets[b, 0]), int(offsets[b, 1]), bool(flips[b]))
        assert torch.equal(out[b], ref), b
    assert torch.equal(out[2], x[2])  # centre crop, no flip = identity
    assert torch.equal(out[5], x[5].flip(-1))


def test_loader_augment() -> None:
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(64)
    plain = InMemoryLoader(x, y, 64, seed=5)
    aug = InMemoryLoader(x, y, 64, seed=5, augment=True)
    (px, py), (ax, ay) = next(iter(plain)), next(iter(aug))
    assert torch.equal(py, ay) and ax.shape == px.shape
    changed = (ax != px).flatten(1).any(1)
    assert changed.float().mean() > 0.5  # most samples are shifted or flipped
    # each augmented sample is one of the 9*9*2 crops/flips of its source
    b = 0
    src = x[ay[b]]
    assert any(
        torch.equal(ax[b], _reference_crop_flip(src, dy, dx, f))
        for dy in range(9) for dx in range(9) for f in (False, True)
    )


def test_loader_augment_does_not_depend_on_batching() -> None:
    x = torch.randn(30, 3, 8, 8)
    y = torch.arange(30)
    a = InMemoryLoader(x, y, 30, seed=7, augment=True)
    b = InMemoryLoader(x, y, 4, seed=7, augment=True)
    ax = torch.cat([bx for bx, _ in a])
    bx = torch.cat([bx for bx, _ in b])
    assert torch.equal(ax, bx)


def test_loader_rejects_bad_args() -> None:
    x, y = _toy(5)
    with pytest.raises(ValueError):
        InMemoryLoader(x, y[:4], 2)
    with pytest.raises(ValueError):
        InMemoryLoader(x, y, 0)
    with pytest.raises(ValueError):
        InMemoryLoader(x, y, 2, rank=2, world_size=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loader_on_cuda() -> None:
    x, y = _toy(20)
    loader = InMemoryLoader(x.cuda(), y.cuda(), 6, augment=False)
    bx, by = next(iter(loader))
    assert bx.is_cuda and by.is_cuda


# ---------------------------------------------------------------------------
# subsets


def test_take_subset() -> None:
    x, y = _toy(100)
    sx, sy = take_subset(x, y, 10, seed=4)
    assert sy.shape == (10,) and len(set(sy.tolist())) == 10
    assert torch.equal(sx[:, 0, 0, 0].long(), sy)
    assert torch.equal(take_subset(x, y, 10, seed=4)[1], sy)  # deterministic
    assert torch.equal(take_subset(x, y, 5, seed=4)[1], sy[:5])  # prefix of a larger subset
    assert not torch.equal(take_subset(x, y, 10, seed=5)[1], sy)
    assert take_subset(x, y, None)[1] is y
    for bad in (0, 101):
        with pytest.raises(UserError, match="--subset"):
            take_subset(x, y, bad)


def test_take_subset_real_is_roughly_balanced(mnist_test) -> None:
    x, y = mnist_test
    _, sy = take_subset(x, y, 1000, seed=0)
    counts = sy.bincount(minlength=10)
    assert counts.min() > 50 and counts.max() < 160


def test_rotate_turns_raw_images_counter_clockwise() -> None:
    from data import rotate

    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    for degrees, k in ((90, 1), (180, 2), (270, 3), (-90, 3)):
        torch.testing.assert_close(rotate(x, degrees), torch.rot90(x.float(), k, (2, 3)), atol=1e-2, rtol=0)
    torch.testing.assert_close(rotate(x, 360), x.float())
    # a small angle moves mass but keeps the image's total intensity near its own (zero background)
    assert (rotate(x, 15) - x.float()).abs().mean() > 1


def test_load_split_rotates_before_normalising_and_normalises_as_another_set(data_root) -> None:
    raw_mnist, _ = load_split("MNIST", False, data_root, download=False)
    rot, _ = load_split("MNIST", False, data_root, download=False, rotate_degrees=90)
    # rotating first keeps the background at MNIST's normalised zero, (0 - 0.1307) / 0.3081
    torch.testing.assert_close(rot, torch.rot90(raw_mnist, 1, (2, 3)), atol=1e-4, rtol=0)
    fmnist, _ = load_split("FashionMNIST", False, data_root, download=False)
    as_mnist, _ = load_split("FashionMNIST", False, data_root, download=False, normalize_as="MNIST")
    torch.testing.assert_close(as_mnist, (fmnist * 0.3530 + 0.2860 - 0.1307) / 0.3081, atol=1e-5, rtol=0)
