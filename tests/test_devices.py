"""GPU and multi-process readiness, checked on the CPU.

* Resume loads the checkpoint onto the CPU whatever the run's device: the RNG state stays a CPU byte
  tensor (``torch.set_rng_state`` needs one) and the optimizers' step counters stay on the CPU. The
  run's device is played by ``meta``, a device other than the CPU that every machine has.
* Only the run's own GPU's RNG state is saved and restored, and only when the run is on a GPU
  (``torch.cuda`` is replaced by a recording fake).
* Optimizer state follows the parameters: an optimizer built before ``model.to(...)`` (float64 plays
  the device) gives the same steps as one built after.
* Data downloads are atomic (``has_data`` never sees a half-written set) and done by one rank per machine.
* Per-step numbers are kept on the device and read once per interval, giving the same sums.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import training
from data import datasets as ds
from data import has_data
from models import build_model
from optimizers import VOGN, NoisyAdam, NoisyKFAC
from util.checkpoint import rng_state, save_atomic, set_rng_state
from util.distributed import DistContext
from util.errors import UserError
from util.run_dir import RunDir

CPU = torch.device("cpu")


def _model(posterior: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", posterior, 1, 28, 10, hidden=[6]).to(dtype)


def _optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if name == "noisy_adam":
        return NoisyAdam(model, num_data=100)
    if name == "vogn":
        return VOGN(model, num_data=100)
    return NoisyKFAC(model, num_data=100, t_inv=2, damping_mode=name.split("_")[-1])


OPTIMIZERS = ("noisy_adam", "vogn", "kfac_factored", "kfac_exact")


def _steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, n: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(2)
    for _ in range(n):
        x = torch.randn(8, 1, 28, 28, generator=gen).to(dtype)
        y = torch.randint(0, 10, (8,), generator=gen)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


# --------------------------------------------------------------------------- 1. resume


@pytest.mark.parametrize("name", ["noisy_adam", "kfac_factored"])
def test_resume_keeps_rng_state_and_step_counters_on_the_cpu(tmp_path: Path, name: str) -> None:
    posterior = "MVG" if name.startswith("kfac") else "FFG"
    model = _model(posterior)
    optimizer = _optimizer(name, model)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    _steps(model, optimizer, 3, torch.float32)
    saved_rng = rng_state(CPU)
    path = tmp_path / "epoch_1.pt"
    save_atomic({"epoch": 1, "iteration": 3, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": [saved_rng]}, path)

    meta = torch.device("meta")  # stands for a GPU: any device but the CPU
    model2 = _model(posterior).to(meta)
    optimizer2 = _optimizer(name, model2)
    scheduler2 = torch.optim.lr_scheduler.ConstantLR(optimizer2, factor=1.0, total_iters=0)
    torch.manual_seed(123)  # another RNG state, to be replaced by the saved one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copying into meta parameters is a no-op, and says so
        ckpt = training.restore(path, model2, optimizer2, scheduler2, DistContext(), meta, seed=0)
    assert ckpt["epoch"] == 1
    assert torch.equal(torch.get_rng_state(), saved_rng["torch"])
    states = list(optimizer2.state.values())
    assert states and all(st["step"].device == CPU for st in states)
    moved = [t for st in states for k, t in st.items() if k != "step"]
    assert moved and all(t.device == meta for t in moved)


# --------------------------------------------------------------------------- 2. CUDA RNG state


class FakeCuda:
    """Records the CUDA RNG calls; fails on the all-GPU ones."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.got: list[str] = []
        self.set: list[tuple[int, str]] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", self._all)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self._all)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self._get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self._set)

    @staticmethod
    def _all(*args, **kwargs):
        raise AssertionError("touched the RNG state of every visible GPU")

    def _get(self, device="cuda") -> torch.Tensor:
        self.got.append(str(device))
        return torch.full((8,), 7, dtype=torch.uint8)

    def _set(self, state: torch.Tensor, device="cuda") -> None:
        self.set.append((int(state[0]), str(device)))


def test_cpu_run_never_touches_cuda_rng(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda(monkeypatch)
    state = rng_state(CPU)
    assert set(state) == {"torch"}
    # a checkpoint written on a GPU host (old format: every GPU; new: one) resumed with --device cpu
    for saved in ([torch.zeros(8, dtype=torch.uint8)] * 2, torch.zeros(8, dtype=torch.uint8)):
        set_rng_state({**state, "cuda": saved}, CPU)
    assert cuda.got == [] and cuda.set == []


def test_gpu_run_saves_and_restores_its_own_device_only(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda(monkeypatch)
    dev = torch.device("cuda", 1)
    state = rng_state(dev)
    assert cuda.got == ["cuda:1"] and torch.equal(state["cuda"], torch.full((8,), 7, dtype=torch.uint8))
    set_rng_state(state, dev)
    assert cuda.set == [(7, "cuda:1")]
    # older checkpoints held a list over the GPUs of the host that wrote them; fewer entries than the
    # run's device index (resumed on another host) must not raise IndexError
    set_rng_state({"torch": state["torch"], "cuda": [torch.full((8,), 5, dtype=torch.uint8)]}, dev)
    set_rng_state({"torch": state["torch"], "cuda": [torch.full((8,), 5, dtype=torch.uint8)] * 2}, dev)
    assert cuda.set == [(7, "cuda:1"), (5, "cuda:1")]


def test_checkpoint_with_cuda_state_resumes_on_a_machine_without_cuda(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = _model("FFG")
    optimizer = _optimizer("noisy_adam", model)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    _steps(model, optimizer, 1, torch.float32)
    rng = {**rng_state(CPU), "cuda": torch.zeros(16, dtype=torch.uint8)}
    path = tmp_path / "epoch_1.pt"
    save_atomic({"epoch": 1, "iteration": 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": [rng]}, path)
    training.restore(path, model, optimizer, scheduler, DistContext(), CPU, seed=0)
    assert torch.equal(torch.get_rng_state(), rng["torch"])


# --------------------------------------------------------------------------- 6. library use


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_built_before_the_parameters_move(name: str) -> None:
    """``model.to(...)`` after the optimizer was built (float64 plays the device) gives the same steps."""
    posterior = "MVG" if name.startswith("kfac") else "FFG"
    early = _model(posterior)
    opt_early = _optimizer(name, early)
    early.to(torch.float64)
    late = _model(posterior, torch.float64)
    opt_late = _optimizer(name, late)
    late.load_state_dict(early.state_dict())  # the same initial posterior (written at construction, in float32)
    _steps(early, opt_early, 3, torch.float64)
    _steps(late, opt_late, 3, torch.float64)
    for (key, a), b in zip(early.state_dict().items(), late.state_dict().values()):
        assert (a.dtype == torch.float64 or not a.is_floating_point()) and torch.equal(a, b), key
    for p in early.parameters():
        for key, t in opt_early.state[p].items():
            assert key == "step" or t.dtype == torch.float64, key


# --------------------------------------------------------------------------- 3. per-step numbers


def test_step_records_sum_like_python_floats_and_name_the_first_bad_step(tmp_path: Path) -> None:
    rec = training.StepRecords(4, CPU)
    losses = [0.25, 1 / 3, 0.7]
    expect = {"loss": 0.0, "correct": 0, "seen": 0}
    for step, value in enumerate(losses, 1):
        loss = torch.tensor(value, dtype=torch.float32)
        logits = torch.eye(10)[:5] if step != 2 else torch.eye(10)[5:]
        y = torch.arange(5)
        rec.add(step, loss, logits, y)
        expect["loss"] += float(loss) * 5
        expect["correct"] += 5 if step != 2 else 0
        expect["seen"] += 5
    totals = {"loss": 0.0, "correct": 0, "seen": 0}
    training.account(rec, (totals,), 1, DistContext(), RunDir(tmp_path))
    assert totals == expect  # bit-identical to reading .item() every step

    rec.add(4, torch.tensor(0.5), torch.eye(10)[:5], torch.arange(5))
    rec.add(5, torch.tensor(math.nan), torch.eye(10)[:5], torch.arange(5))
    rec.add(6, torch.tensor(math.inf), torch.eye(10)[:5], torch.arange(5))
    with pytest.raises(training.Diverged, match=r"^training diverged at epoch 3, step 5 \(loss = nan\)"):
        training.account(rec, (totals,), 3, DistContext(), RunDir(tmp_path))


# --------------------------------------------------------------------------- 4. data download


def test_download_is_atomic(tmp_path: Path, no_data_env: Path, monkeypatch: pytest.MonkeyPatch, datafiles) -> None:
    root = tmp_path / "data"
    seen = []

    def fetch(name: str, into: Path) -> None:  # writes file by file, as a real download does
        datafiles.write_fake_mnist(into, name)
        seen.append(has_data(name, root))

    monkeypatch.setattr(ds, "_fetch", fetch)
    assert ds.ensure_data("MNIST", root) == root
    assert seen == [False] and has_data("MNIST", root)
    assert [p.name for p in root.iterdir()] == ["MNIST"]  # no temp folder left


def test_failed_download_leaves_no_files(tmp_path: Path, no_data_env: Path, monkeypatch: pytest.MonkeyPatch,
                                         datafiles) -> None:
    root = tmp_path / "data"

    def fetch(name: str, into: Path) -> None:
        datafiles.write_idx(into / name / "raw" / "train-images-idx3-ubyte", torch.zeros(2, 28, 28).numpy())
        raise OSError("connection reset")

    monkeypatch.setattr(ds, "_fetch", fetch)
    with pytest.raises(UserError, match="download failed: connection reset"):
        ds.ensure_data("MNIST", root)
    assert not root.exists() or list(root.rglob("*")) == []


@pytest.mark.parametrize("local_rank", [0, 1])
def test_one_rank_per_machine_downloads(monkeypatch: pytest.MonkeyPatch, local_rank: int) -> None:
    calls, flags = [], []
    monkeypatch.setattr(training, "ensure_data", lambda name, root: calls.append(name))

    def barrier(flag: bool, ctx: DistContext) -> bool:  # the all-reduce every rank waits at
        flags.append(flag)
        return flag

    monkeypatch.setattr(training.distributed, "broadcast_flag", barrier)
    training.fetch_data("MNIST", None, DistContext(rank=local_rank + 2, world_size=4, local_rank=local_rank))
    assert calls == (["MNIST"] if local_rank == 0 else []) and flags == [False]


def test_failed_download_stops_every_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str, root: object) -> None:
        raise UserError("MNIST data not found (download failed)")

    monkeypatch.setattr(training, "ensure_data", offline)
    monkeypatch.setattr(training.distributed, "broadcast_flag", lambda flag, ctx: True)  # rank 0 failed
    with pytest.raises(UserError, match="download failed"):
        training.fetch_data("MNIST", None, DistContext(rank=0, world_size=2))
    with pytest.raises(UserError, match="see the error of local rank 0"):
        training.fetch_data("MNIST", None, DistContext(rank=1, world_size=2, local_rank=1))


def test_state_dict_before_the_first_step_round_trips() -> None:
    model = _model("MVG")
    optimizer = _optimizer("kfac_factored", model)
    again = _optimizer("kfac_factored", copy.deepcopy(model))
    again.load_state_dict(optimizer.state_dict())
    assert again.kronecker_factors() == {}
