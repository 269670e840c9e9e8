"""The optimizer registry: an optimizer declared outside the library trains through ``train.py`` once registered.

``SignSGD`` below is declared here and nowhere else (its name, the MAP posterior, its flags ``--lr`` and
``--momentum``, their defaults in its signature, its own checks). Registered, it is a choice of ``--optimizer``
with its defaults in ``--help``, its flags resolve to its signature's defaults, ``train.py`` trains and saves a
run with it, a value its constructor rejects is the one-line CLI error in flag names, and a flag it does not
take is refused. Also: the built-in declarations give the compatibility and defaults the CLI applies, and
``make_optimizer`` turns a constructor's ``ValueError`` into a ``UserError`` for callers that skip the parser.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import train
from experiment import make_model, make_optimizer
from optimizers import NoisyAdam, NoisyKFAC
from optimizers.registry import (
    OPTIMIZERS,
    compatible_optimizers,
    default_optimizers,
    optimizer_defaults,
    register,
    unregister,
)
from option_parser import TrainOptions, run_keys
from util.errors import UserError, run_cli


class SignSGD(torch.optim.Optimizer):
    """``v <- momentum v + sign(g)``, ``w <- w - lr v``: a MAP optimizer the library does not know."""

    cli_name = "sign_sgd"
    posterior = "MAP"
    cli_flags = {"lr": "lr", "momentum": "beta"}

    def __init__(self, model: nn.Module, lr: float = 0.02, beta: float = 0.5) -> None:
        if not 0 <= beta < 1:
            raise ValueError(f"beta must lie in [0, 1), got {beta}")
        super().__init__(model.parameters(), {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                v = self.state[p].setdefault("v", torch.zeros_like(p))
                v.mul_(group["beta"]).add_(p.grad.sign())
                p.add_(v, alpha=-group["lr"])


@pytest.fixture
def sign_sgd() -> Iterator[None]:
    register(SignSGD)
    yield
    unregister("sign_sgd")


def fails(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """The one ``error:`` line (exit 2) of ``train.py argv``."""
    with pytest.raises(SystemExit) as e:
        run_cli(train.main, argv)
    assert e.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_a_registered_optimizer_trains_through_train_py(sign_sgd: None, tmp_path: Path, datafiles,
                                                        capsys: pytest.CaptureFixture) -> None:
    data = datafiles.write_fake_mnist(tmp_path / "data")
    argv = ["--model", "MAP", "--optimizer", "sign_sgd", "--epoch", "2", "--batch_size", "10", "--data_root",
            str(data), "--ckpt_dir", str(tmp_path / "ckpt"), "--no_visdom", "--no_progress", "--device", "cpu"]
    text = " ".join(TrainOptions().build_parser().format_help().split())
    assert "sgd 0.1, sign_sgd 0.02;" in text and "sign_sgd" in text.split("--optimizer {")[1].split("}")[0]
    assert {"lr", "momentum"} <= set(run_keys())  # test.py takes its flags from the run

    assert run_cli(train.main, [*argv, "--name", "run"]) == 0
    run = tmp_path / "ckpt" / "run"
    saved = json.loads((run / "opt.json").read_text())
    assert (saved["optimizer"], saved["lr"], saved["momentum"], saved["eps"]) == ("sign_sgd", 0.02, 0.5, None)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    state = torch.load(run / "epoch_2.pt", weights_only=False)["optimizer"]
    assert state["param_groups"][0]["lr"] == 0.02 and state["param_groups"][0]["beta"] == 0.5
    assert all("v" in s for s in state["state"].values())  # its own step ran
    capsys.readouterr()

    # a value its constructor rejects: the class's message in flag names, one line, before any work
    line = fails(capsys, [*argv, "--name", "bad", "--momentum", "1"])
    assert line == "error: --momentum must lie in [0, 1), got 1.0 (--optimizer sign_sgd)"
    assert not (tmp_path / "ckpt" / "bad").exists()
    # a flag it does not declare, and a model it does not train
    assert "--eps is not an option of --optimizer sign_sgd; drop --eps" in fails(capsys, [*argv, "--eps", "1"])
    line = fails(capsys, [*argv[2:], "--model", "FFG"])
    assert line.endswith("(sign_sgd trains --model MAP); use --optimizer noisy_adam or vogn")


def test_unregistered_is_no_choice(capsys: pytest.CaptureFixture) -> None:
    assert "sign_sgd" not in OPTIMIZERS
    assert "invalid choice: 'sign_sgd'" in fails(capsys, ["--model", "MAP", "--optimizer", "sign_sgd"])


def test_the_builtin_declarations() -> None:
    assert default_optimizers() == {"FFG": "noisy_adam", "MVG": "noisy_kfac", "MAP": "adam"}
    assert {p: compatible_optimizers(p) for p in ("FFG", "MVG", "MAP")} == {
        "FFG": ("noisy_adam", "vogn"), "MVG": ("noisy_kfac",), "MAP": ("adam", "sgd")}
    assert optimizer_defaults("noisy_adam")["momentum"] == 0.9 and optimizer_defaults("noisy_adam")["beta2"] == 0.9999
    assert optimizer_defaults("noisy_kfac")["kfac_rank"] is None and optimizer_defaults("sgd") == {"lr": 0.1,
                                                                                                  "momentum": 0.9}
    # a flag's values reach the constructor argument it names (a tuple element for Noisy Adam's betas)
    o = TrainOptions().parse(["--momentum", "0.5", "--beta2", "0.25", "--device", "cpu"])
    assert make_optimizer(o, make_model(o)).param_groups[0]["betas"] == (0.5, 0.25)
    o = TrainOptions().parse(["--model", "MVG", "--kfac_rank", "3", "--kfac_conv_stride", "1", "--device", "cpu"])
    group = make_optimizer(o, make_model(o)).param_groups[0]
    assert (group["rank"], group["conv_stats_stride"], group["kl_clip"]) == (3, 1, 1e-4)
    assert isinstance(OPTIMIZERS["noisy_adam"].factory, type) and OPTIMIZERS["noisy_adam"].factory is NoisyAdam


def test_make_optimizer_turns_a_constructors_value_error_into_a_user_error() -> None:
    """Callers that build options without the parser (the bench) get the same message."""
    o = argparse.Namespace(model="MVG", optimizer="noisy_kfac", arch="mlp", hidden=[4], dataset="MNIST", n=100,
                           kfac_rank=4, damping_mode="exact")
    with pytest.raises(UserError, match=r"^--kfac_rank must be None or a positive integer with --damping_mode "
                                        r"factored, got 4 with 'exact' \(--optimizer noisy_kfac\)$"):
        make_optimizer(o, make_model(o))
    o.kfac_rank = None
    assert isinstance(make_optimizer(o, make_model(o)), NoisyKFAC)


def test_parsing_leaves_the_random_state_alone() -> None:
    """The parser checks the optimizer flags by building the optimizer on a tiny network, under a forked RNG."""
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    TrainOptions().parse(["--model", "MVG", "--device", "cpu"])
    assert torch.equal(torch.rand(3), expected)
