"""Resuming is bit-exact: a run saved part-way and resumed ends where the uninterrupted run ends, bit for bit.

Two harnesses, one row per configuration:

* ``test_state_dict_resume_is_bit_exact``: ``steps`` optimizer steps in a row, against ``steps // 2`` steps, a
  ``torch.save`` of the model's and the optimizer's state dicts and the RNG state, a ``torch.load``
  (``weights_only``) into fresh objects built with other initial weights, and the remaining steps. Equal: the
  model state (BatchNorm running statistics included), every optimizer state tensor (values, dtype, device) and
  the RNG state after the last step.
* ``test_train_py_resume_is_bit_exact``: ``train.py`` (in this process) for 2 epochs, against 1 epoch and then
  ``--resume`` to 2, on tiny MNIST-format files. Equal: every tensor of the epoch-2 checkpoints' model and
  optimizer, and ``metrics.jsonl`` record for record except the wall clock.

The resumes through the scripts in subprocesses (with real MNIST, learning-rate schedules, ``--fisher true``), after
SIGKILL and on two machines are in ``test_cli_end_to_end``, ``test_faults`` and ``test_distributed``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import assert_same_checkpoint, assert_same_training_state, run_test_py
from nets import train_steps

import models
from optimizers import VOGN, NoisyAdam, NoisyKFAC
from optimizers.base import PRIOR_VAR_START
from util.checkpoint import load_checkpoint


# ================================================================== the optimizer's state dict, step by step
@dataclass(frozen=True)
class StepRow:
    posterior: str
    make_opt: Callable[[torch.nn.Module], torch.optim.Optimizer]
    arch: str = "mlp"
    hidden: tuple[int, ...] = (6,)  # the MLP's hidden sizes
    image: int = 4  # image side: 1 x image x image inputs, 3 classes
    steps: int = 10
    samples: int = 1  # forward/backward passes (MC samples) per step
    model_keys: tuple[str, ...] = ()  # state-dict keys the configuration must have (so that it is what it says)
    state_keys: tuple[str, ...] = ()  # optimizer state keys the first layer must have


KFAC = dict(lr=1e-2, num_data=100, t_inv=3, t_stats=2)
RESNET = dict(arch="resnet20", image=6, steps=6, model_keys=("layer1.0.bn1.running_var", "layer1.0.bn1.weight_sigma"))
STEP_ROWS = {
    "noisy_adam": StepRow("FFG", lambda m: NoisyAdam(m, lr=1e-2, num_data=100)),
    "noisy_adam_batch": StepRow("FFG", lambda m: NoisyAdam(m, lr=1e-2, num_data=100, fisher="batch")),
    "vogn": StepRow("FFG", lambda m: VOGN(m, lr=1e-2, momentum=0.9, num_data=100)),
    "kfac_factored": StepRow("MVG", lambda m: NoisyKFAC(m, kl_clip=1e-2, **KFAC)),
    "kfac_exact": StepRow("MVG", lambda m: NoisyKFAC(m, damping_mode="exact", **KFAC), state_keys=("QA",)),
    "kfac_true_fisher": StepRow("MVG", lambda m: NoisyKFAC(m, fisher="true", **KFAC)),
    "kfac_rank": StepRow("MVG", lambda m: NoisyKFAC(m, rank=2, **KFAC), state_keys=("A_inv_coef",)),
    "kfac_tridiagonal": StepRow("MVG", lambda m: NoisyKFAC(m, structure="block_tridiagonal", **KFAC), hidden=(6, 5),
                                samples=2, model_keys=("fc1.link_out",), state_keys=("gain",)),
    "resnet20_noisy_adam": StepRow("FFG", lambda m: NoisyAdam(m, lr=1e-2, num_data=100, norm_posterior="gaussian"),
                                   **RESNET),
    "resnet20_vogn_point": StepRow("FFG", lambda m: VOGN(m, lr=1e-2, num_data=100), **RESNET),
    "resnet20_kfac": StepRow("MVG", lambda m: NoisyKFAC(m, norm_posterior="gaussian", **KFAC), **RESNET),
}


@pytest.mark.parametrize("row", list(STEP_ROWS))
def test_state_dict_resume_is_bit_exact(row: str) -> None:
    r = STEP_ROWS[row]
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 1, r.image, r.image, generator=gen), torch.randint(0, 3, (8,), generator=gen))
               for _ in range(r.steps)]

    def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        extra = {"hidden": r.hidden} if r.arch == "mlp" else {}
        model = models.build_model(r.arch, r.posterior, 1, r.image, 3, **extra)
        return model, r.make_opt(model)

    model_a, opt_a = build(0)
    torch.manual_seed(123)
    train_steps(model_a, opt_a, batches, r.samples)
    rng_a = torch.get_rng_state()

    model_b, opt_b = build(0)
    torch.manual_seed(123)
    train_steps(model_b, opt_b, batches[:r.steps // 2], r.samples)
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "rng": torch.get_rng_state()}, buf)
    del model_b, opt_b
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_c, opt_c = build(999)  # fresh objects, other initial weights
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    train_steps(model_c, opt_c, batches[r.steps // 2:], r.samples)

    assert_same_training_state(model_a, opt_a, model_c, opt_c)
    assert torch.equal(torch.get_rng_state(), rng_a)
    assert all(key in model_a.state_dict() for key in r.model_keys)
    first = next(p for p in model_a.parameters() if p in opt_a.state)
    assert all(key in opt_a.state[first] for key in r.state_keys)


# ======================================================================= train.py: 2 epochs == 1 + --resume
def check_resnet20(ckpt: dict, run: Path, out: str) -> None:
    assert ckpt["model"]["layer1.0.bn1.num_batches_tracked"] == 6  # 3 steps an epoch: the running statistics


def check_auto_prior(ckpt: dict, run: Path, out: str) -> None:
    """eta is in the optimizer's state, estimated mid-epoch (every 2nd of 3 steps an epoch), and streamed: the last
    epoch's record has each layer's eta and the ELBO of its parts."""
    prior = ckpt["optimizer"]["prior"]
    assert prior["steps"] == 6 and prior["prior_vars"] != [PRIOR_VAR_START] * 2
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["kind"] == "epoch" and last["prior_var"] == dict(zip(("fc1", "fc2"), prior["prior_vars"]))
    assert last["elbo"] == pytest.approx(last["expected_loglik"] - last["kl"], rel=1e-12)
    assert last["expected_loglik"] == pytest.approx(-60 * last["train_loss"], rel=1e-12)
    assert "elbo" in out and "KL" in out


def check_tridiagonal(ckpt: dict, run: Path, out: str) -> None:
    """The chain's links were learned, and test.py loads the run."""
    assert ckpt["model"]["fc1.link_out"].abs().sum() > 0
    result = run_test_py(["--ckpt_dir", str(run.parent), "--name", run.name, "--test_samples", "3", "--device",
                          "cpu"], cwd=run.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"test_acc"' in result.stdout


@dataclass(frozen=True)
class TrainRow:
    flags: tuple[str, ...]
    check: Callable[[dict, Path, str], None]  # on the uninterrupted run's epoch-2 checkpoint, its folder, stdout
    n_train: int = 60
    n_test: int = 20
    slow: bool = False


RESNET20 = ("--arch", "resnet20", "--batch_size", "16")
AUTO_PRIOR = ("--prior_var", "auto", "--prior_every", "2", "--hidden", "8", "--batch_size", "20", "--n", "60")
TRAIN_ROWS = {
    "resnet20_vogn": TrainRow((*RESNET20, "--model", "FFG", "--optimizer", "vogn", "--norm_posterior", "gaussian"),
                              check_resnet20, n_train=48, n_test=8, slow=True),
    "resnet20_noisy_kfac": TrainRow((*RESNET20, "--model", "MVG", "--t_stats", "1", "--t_inv", "2"), check_resnet20,
                                    n_train=48, n_test=8, slow=True),
    "auto_prior_FFG": TrainRow(("--model", "FFG", *AUTO_PRIOR, "--beta2", "0.9"), check_auto_prior),
    "auto_prior_MVG": TrainRow(("--model", "MVG", *AUTO_PRIOR, "--t_inv", "2"), check_auto_prior),
    "kfac_tridiagonal": TrainRow(("--model", "MVG", "--kfac_structure", "block_tridiagonal", "--hidden", "8", "6",
                                  "--batch_size", "20", "--t_inv", "2"), check_tridiagonal),
}


def without_wall_clock(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "sec_per_epoch"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("row", [pytest.param(row, id=name, marks=[pytest.mark.slow] if row.slow else [])
                                 for name, row in TRAIN_ROWS.items()])
def test_train_py_resume_is_bit_exact(tmp_path: Path, datafiles, capsys: pytest.CaptureFixture[str],
                                      row: TrainRow) -> None:
    import train  # in-process: three interpreter starts would cost most of the test's time

    data = datafiles.write_fake_mnist(tmp_path / "data", n_train=row.n_train, n_test=row.n_test)
    common = [*row.flags, "--data_root", str(data), "--ckpt_dir", str(tmp_path / "ckpt"), "--no_visdom",
              "--no_progress", "--device", "cpu", "--test_samples", "2", "--num_threads", "1"]
    for name, *flags in (("whole", "--epoch", "2"), ("part", "--epoch", "1"), ("part", "--epoch", "2", "--resume")):
        train.main([*common, "--name", name, *flags])
    out = capsys.readouterr().out
    whole, part = (tmp_path / "ckpt" / name for name in ("whole", "part"))
    a, b = (load_checkpoint(run / "epoch_2.pt") for run in (whole, part))
    assert_same_checkpoint(a, b, ("model", "optimizer"))
    assert without_wall_clock(whole) == without_wall_clock(part)
    row.check(a, whole, out)
