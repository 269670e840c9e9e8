"""Shared test fixtures and helpers.

* ``data_root``: the real MNIST/FashionMNIST folder (``$DATA_ROOT`` if it has
  MNIST, else ``../shared/data`` from the repository root); tests that use it
  are skipped when it is absent.
* ``mnist_test``: the real MNIST test split (loaded once per session).
* ``no_data_env``: runs the test in an empty temporary cwd with ``$DATA_ROOT``
  unset, so ``./data`` and the environment cannot leak in.
* ``write_idx``, ``write_fake_mnist``, ``write_fake_cifar``: tiny data files in
  the real on-disk formats.
* ``float64``: the test runs with float64 as torch's default dtype.
* Comparisons: the curvature statistics against the per-example loops of ``reference``
  (``assert_sum_grad_squared_matches_loop``, ``assert_kronecker_factors_match_loop``), two checkpoints or two
  trainings bit for bit (``assert_same_checkpoint``, ``assert_same_training_state``), and Noisy K-FAC step by
  step beside ``reference.NoisyKFACReference`` (``assert_noisy_kfac_follows_reference``).
* Processes: ``run_ranks`` (spawned gloo ranks), ``run_test_py`` (test.py in this process), ``free_port``;
  ``require``/``require_module`` skip, or fail under CI.

Tiny networks and batches are in ``nets.py``, the independent references in ``reference.py``.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHARED_DATA = REPO.parent / "shared" / "data"


def _real_data_root() -> Path | None:
    from data.datasets import has_data

    env = os.environ.get("DATA_ROOT")
    for cand in ([Path(env)] if env else []) + [SHARED_DATA]:
        if has_data("MNIST", cand):
            return cand.resolve()  # absolute: tests run scripts from folders of their own, $DATA_ROOT may be relative
    return None


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return REPO


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Folder holding the real MNIST (and FashionMNIST) raw files; skips if absent."""
    root = _real_data_root()
    if root is None:
        pytest.skip(f"real data not found (set $DATA_ROOT or provide {SHARED_DATA})")
    return root


@pytest.fixture(scope="session")
def mnist_test(data_root: Path):
    """The real MNIST test split as (images, labels) tensors."""
    from data import load_split

    return load_split("MNIST", train=False, data_root=data_root, download=False)


@pytest.fixture
def no_data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty cwd, no ``$DATA_ROOT``: only explicit roots can be found."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("DATA_ROOT", raising=False)
    return work


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array in the IDX format (big-endian header) used by MNIST."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.tobytes())
    return path


def write_fake_mnist(root: Path, name: str = "MNIST", n_train: int = 20, n_test: int = 10, seed: int = 0) -> Path:
    """A tiny MNIST-format data set under ``root/<name>/raw``; returns ``root``."""
    rng = np.random.default_rng(seed)
    raw = root / name / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return root


def write_fake_cifar(root: Path, per_batch: int = 4, n_test: int = 6, seed: int = 0) -> dict:
    """A tiny CIFAR-10 python-pickle data set under ``root/cifar-10-batches-py``.

    Returns the arrays written: ``{"train": (data N x 3072, labels), "test": ...}``.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_data, train_labels = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"batch_label": f"training batch {i} of 5", "labels": labels, "data": data,
                         "filenames": [f"img{i}_{j}.png" for j in range(per_batch)]}, f, protocol=2)
        train_data.append(data)
        train_labels += labels
    test_data = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_labels = [int(x) for x in rng.integers(0, 10, n_test)]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "labels": test_labels, "data": test_data,
                     "filenames": [f"t{j}.png" for j in range(n_test)]}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                     "horse", "ship", "truck"], "num_cases_per_batch": per_batch,
                     "num_vis": 3072}, f, protocol=2)
    return {
        "train": (np.concatenate(train_data), np.array(train_labels)),
        "test": (test_data, np.array(test_labels)),
    }


class DataFiles:
    """The file writers above, as a fixture (works whether or not tests/ is a package)."""

    write_idx = staticmethod(write_idx)
    write_fake_mnist = staticmethod(write_fake_mnist)
    write_fake_cifar = staticmethod(write_fake_cifar)


@pytest.fixture
def datafiles() -> type[DataFiles]:
    """Helpers that write tiny MNIST (IDX) and CIFAR-10 (pickle) files."""
    return DataFiles


@pytest.fixture
def float64():
    """Run the test with float64 as torch's default dtype (math checks against references)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback TCP ports that were free a moment ago (all bound at once, then closed)."""
    import contextlib
    import socket

    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (nothing listens there once the socket is closed)."""
    return free_ports(1)[0]


def in_ci() -> bool:
    """True under CI (``$CI`` set to anything but empty/0/false, as GitHub Actions and ``.ci/run`` do)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(ok: bool, reason: str) -> None:
    """Skip with ``reason`` when ``ok`` is false; under CI (``in_ci()``) fail instead.

    A missing browser or benchmark peer must not turn CI green by skipping what it guards.
    """
    if ok:
        return
    if in_ci():
        pytest.fail(f"{reason} (a failure under CI=$CI, where it must be present)", pytrace=False)
    pytest.skip(reason)


def require_module(name: str) -> object:
    """``pytest.importorskip(name)``, except that under CI a missing module is a failure."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        require(False, f"module {name!r} is not installed ({e}); `make setup` installs it")


def tensors(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in nested dicts/lists/tuples (a checkpoint), by path: to compare two of them bit for bit."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out: dict[str, torch.Tensor] = {}
    for k, v in items:
        out.update(tensors(v, f"{prefix}/{k}"))
    return out


def assert_stats_close(got: dict, ref: dict, rtol: float = 1e-6, atol: float = 1e-14) -> None:
    """Per-parameter statistics ``{name: tensor}`` equal the reference's: the same names in the same order, shapes
    and values (float64 checks: to rounding)."""
    assert list(got) == list(ref)
    for name in ref:
        assert got[name].shape == ref[name].shape, name
        torch.testing.assert_close(got[name], ref[name], rtol=rtol, atol=atol, msg=name)


def assert_factors_close(got: dict, ref: dict, rtol: float = 1e-6, atol: float = 1e-14) -> None:
    """Kronecker factors ``{layer: (A, S)}`` equal the reference's, layer by layer in the same order."""
    assert list(got) == list(ref)
    for name in ref:
        for which, g, r in zip("AS", got[name], ref[name]):
            assert g.shape == r.shape, (name, which)
            torch.testing.assert_close(g, r, rtol=rtol, atol=atol, msg=f"{name} {which}")


def assert_sum_grad_squared_matches_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """``optimizers.sum_grad_squared`` equals the per-example loop of ``reference``: one entry per parameter, in
    the model's order, and no parameter's ``.grad`` touched."""
    from reference import naive_sum_grad_squared

    import optimizers

    got = optimizers.sum_grad_squared(model, x, y)
    assert list(got) == [n for n, _ in model.named_parameters()]
    assert_stats_close(got, naive_sum_grad_squared(model, x, y))
    assert all(p.grad is None for p in model.parameters()), "a .grad was touched"


def assert_kronecker_factors_match_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """``optimizers.kronecker_factors`` equals the per-example loop of ``reference`` and touches no ``.grad``;
    returns the factors ``{layer: (A, S)}``."""
    from reference import naive_kronecker_factors

    import optimizers

    got = optimizers.kronecker_factors(model, x, y)
    assert_factors_close(got, naive_kronecker_factors(model, x, y))
    assert all(p.grad is None for p in model.parameters()), "a .grad was touched"
    return got


def assert_same_checkpoint(a: dict, b: dict, keys: tuple[str, ...] = ("model", "optimizer", "rng")) -> None:
    """The ``keys`` of two checkpoints are bit-identical: every tensor (by path, as ``tensors`` names them) equal in
    value and dtype, and every other leaf (step counts, learning rates, the learned prior, ...) equal. Only an
    optimizer's param groups may hold hyper-parameters the other lacks: loading a state dict fills in the
    optimizer's defaults (torch's ``differentiable`` among them), so a resumed run's groups can have more."""

    def leaves(obj: object, prefix: str) -> dict[str, object]:
        if isinstance(obj, dict | list | tuple):
            items = obj.items() if isinstance(obj, dict) else enumerate(obj)
            return {path: leaf for k, v in items for path, leaf in leaves(v, f"{prefix}/{k}").items()}
        return {prefix: obj}

    la, lb = leaves({k: a[k] for k in keys}, ""), leaves({k: b[k] for k in keys}, "")
    one_sided = la.keys() ^ lb.keys()
    assert all("/param_groups/" in p and not torch.is_tensor({**la, **lb}[p]) for p in one_sided), one_sided
    for path in la.keys() & lb.keys():
        x, y = la[path], lb[path]
        if torch.is_tensor(x):
            assert x.dtype == y.dtype and torch.equal(x, y), path
        else:
            assert x == y, path


def assert_same_training_state(model_a, opt_a, model_b, opt_b) -> None:
    """Bit-equal model state dicts and per-parameter optimizer states (same keys, ``torch.equal`` values, and the
    same dtype and device: ``torch.equal`` compares across dtypes)."""
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters()):
        st_a, st_b = opt_a.state[p_a], opt_b.state[p_b]
        assert st_a.keys() == st_b.keys()
        for key in st_a:
            assert torch.equal(st_a[key], st_b[key]), key
            if torch.is_tensor(st_a[key]):
                assert (st_a[key].dtype, st_a[key].device) == (st_b[key].dtype, st_b[key].device), key


def run_ranks(worker: Callable[..., None], *args: object, nprocs: int = 2, timeout: float = 120.0) -> None:
    """Run ``worker(rank, *args)`` in ``nprocs`` spawned processes; fail the test if they outlive ``timeout`` s
    (a collective that deadlocked), killing them."""
    import torch.multiprocessing as mp

    procs = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not procs.join(timeout=1):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail(f"the {nprocs} ranks did not finish within {timeout:.0f} s (a collective deadlocked?)")


def assert_noisy_kfac_follows_reference(net: torch.nn.Module, layers: list[torch.nn.Module],
                                        opt: torch.optim.Optimizer, ref, x: torch.Tensor, y: torch.Tensor,
                                        samples: tuple[int, ...], seed: int, rtol: float = 1e-8,
                                        atol: float = 1e-12) -> None:
    """Step the library's Noisy K-FAC ``opt`` on ``net`` beside ``ref`` (``reference.NoisyKFACReference`` of the
    same ``layers``), ``samples[k]`` forward/backward passes before step k + 1, each reseeded (``seed + 1``, ...).

    Checked: each pass's noise against the reference's sampler for the same ``eps`` (the layers draw
    ``E ~ N(0, I)`` of their matrix shape, in forward order), and after every step the means, the factors ``A``
    and ``S``, the momentum, the step count and the posterior std; that the KL clip engaged when it is on, and
    that the steps moved every layer by more than the tolerance (the comparisons mean something)."""
    from reference import weight_matrix

    def close(got: torch.Tensor, expected: torch.Tensor, msg: str) -> None:
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=msg)

    def mean(layer):
        return weight_matrix(layer, layer.weight.detach(), layer.bias.detach() if layer.bias is not None else None)

    def std(layer):
        return weight_matrix(layer, layer.weight_std(), layer.bias_std())

    start = [mean(layer).clone() for layer in layers]
    for ell, layer in enumerate(layers):
        close(std(layer), ref.std(ell), f"initial std {ell}")
    for k, n_samples in enumerate(samples, 1):
        opt.zero_grad()
        noises = []
        for _ in range(n_samples):
            seed += 1
            torch.manual_seed(seed)
            F.cross_entropy(net(x), y).backward()
            noise = [weight_matrix(m, *m.last_noise) for m in layers]
            torch.manual_seed(seed)
            eps = [torch.randn(m.shape) for m in ref.M]
            for ell, layer in enumerate(layers):
                st = opt.state[layer.weight]
                eigen = (st["QA"], st["dA"], st["QS"], st["dS"]) if "QA" in st else None  # exact damping's basis
                close(noise[ell], ref.noise(ell, eps[ell], eigen), f"noise {ell} step {k}")
            noises.append(noise)
        opt.step()
        ref.step(x, y, noises)
        for ell, layer in enumerate(layers):
            st = opt.state[layer.weight]
            close(mean(layer), ref.M[ell], f"mean {ell} step {k}")
            close(st["A"], ref.A[ell], f"A {ell} step {k}")
            close(st["S"], ref.S[ell], f"S {ell} step {k}")
            close(st["momentum_buffer"], ref.buf[ell], f"momentum {ell} step {k}")
            close(std(layer), ref.std(ell), f"std {ell} step {k}")
            assert st["step"].item() == k
    if ref.kl_clip is not None:
        assert min(ref.nus) < 1.0, "the KL clip never engaged: the test would not see it"
    assert all((m - m0).abs().max() > 1e-4 for m, m0 in zip(ref.M, start))


def run_test_py(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python test.py ARGV`` from ``cwd``, as test.py's ``main`` in this process (no second start-up of torch);
    the global RNG state is restored afterwards."""
    import contextlib
    import importlib.util
    import io

    from util.errors import run_cli

    spec = importlib.util.spec_from_file_location("test_py_script", REPO / "test.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng(devices=[]), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.chdir(cwd)
        code = run_cli(script.main, argv)
    return subprocess.CompletedProcess(["test.py", *argv], code, out.getvalue(), err.getvalue())
