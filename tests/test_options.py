"""Tests for option_parser.py: defaults, derived values, validation, saving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiment import make_model, make_optimizer, optimizer_defaults
from option_parser import TestOptions as _TestOptions  # "Test*" names would be collected by pytest
from option_parser import TrainOptions, format_options, save_options
from util.checkpoint import save_atomic

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def train(*argv: str):
    return TrainOptions().parse(list(argv))


def fails(capsys: pytest.CaptureFixture, parse, argv: list[str]) -> str:
    """Run ``parse(argv)``; assert exit 2 with one ``error:`` line on stderr; return it."""
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "usage:" not in err
    return lines[0]


# ---------------------------------------------------------------------------
# defaults


def test_train_defaults() -> None:
    o = train()
    assert (o.model, o.optimizer, o.arch, o.dataset) == ("FFG", "noisy_adam", "mlp", "MNIST")
    assert o.hidden == [100] and o.batch_size == 100 and o.epoch == 20
    assert o.n == 60000 and o.initial_size == 784 and o.label_size == 10
    assert o.kl_weight == 1.0 and o.train_samples == 1 and o.test_samples == 10 and o.seed == 0
    # every optimizer option resolved to Noisy Adam's own defaults; the ones it does not take stay None
    assert (o.lr, o.momentum, o.beta2, o.prior_var, o.damping, o.init_precision, o.fisher) == (
        3e-3, 0.9, 0.9999, 1.0, 1e-3, 1e3, "example")
    assert o.eps is None and o.t_stats is None and o.t_inv is None and o.kl_clip is None and o.damping_mode is None
    assert o.lr_schedule == "none" and o.lr_decay == 0.1 and o.lr_step == 30
    assert o.device == "cpu" and o.ckpt_dir == "checkpoints"
    assert o.name == "MNIST_FFG_noisy_adam_mlp" and o.run_dir == os.path.join("checkpoints", o.name)
    assert o.display_server == "http://localhost" and o.display_port == 8097 and o.env == "main"
    assert not o.no_visdom and not o.no_progress and not o.resume and not o.augment
    assert o.is_train and o.explicit == []


@pytest.mark.parametrize(
    ("argv", "optimizer", "arch"),
    [
        (["--model", "MVG"], "noisy_kfac", "mlp"),
        (["--model", "MAP"], "adam", "mlp"),
        (["--model", "FFG", "--optimizer", "vogn"], "vogn", "mlp"),
        (["--model", "MAP", "--optimizer", "sgd"], "sgd", "mlp"),
        (["--dataset", "CIFAR10"], "noisy_adam", "lenet5"),
        (["--dataset", "FashionMNIST", "--arch", "covnet"], "noisy_adam", "covnet"),
    ],
)
def test_derived_defaults(argv: list[str], optimizer: str, arch: str) -> None:
    o = train(*argv)
    assert o.optimizer == optimizer and o.arch == arch
    assert o.name == f"{o.dataset}_{o.model}_{o.optimizer}_{o.arch}"


def test_cifar_sizes_and_subset() -> None:
    o = train("--dataset", "CIFAR10", "--subset", "500")
    assert o.initial_size == 3072 and o.label_size == 10 and o.n == 500 and o.subset == 500
    assert train("--subset", "500", "--n", "1000").n == 1000
    assert train("--initial_size", "784", "--label_size", "10").initial_size == 784


@pytest.mark.parametrize(("argv", "hidden"), [
    (["--hidden", "400,400"], [400, 400]),
    (["--hidden", "400", "200"], [400, 200]),
    (["--hidden", "50"], [50]),
])
def test_hidden(argv: list[str], hidden: list[int]) -> None:
    assert train(*argv).hidden == hidden


def test_explicit_records_given_flags() -> None:
    assert train("--model", "MAP", "--lr", "0.1", "--no_visdom").explicit == ["lr", "model", "no_visdom"]


def test_device_cuda_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train().device == "cuda" and train("--device", "cpu").device == "cpu"


# ---------------------------------------------------------------------------
# validation: one line, exit 2


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--model", "XYZ"], "invalid choice"),
        (["--dataset", "SVHN"], "invalid choice"),
        (["--optimizer", "rmsprop"], "invalid choice"),
        (["--bogus"], "unrecognized arguments"),
        (["--batch_size", "ten"], "invalid int"),
        (["--batch_size", "0"], "--batch_size"),
        (["--batch_size", "-5"], "--batch_size"),
        (["--lr", "-0.1"], "--lr"),
        (["--lr", "0"], "--lr"),
        (["--epoch", "0"], "--epoch"),
        (["--model", "MVG", "--optimizer", "vogn"], "use --optimizer noisy_kfac"),
        (["--model", "MVG", "--optimizer", "noisy_adam"], "use --optimizer noisy_kfac"),
        (["--model", "MVG", "--optimizer", "adam"], "use --optimizer noisy_kfac"),
        (["--model", "FFG", "--optimizer", "noisy_kfac"], "trains --model MVG"),
        (["--optimizer", "noisy_kfac"], "trains --model MVG"),
        (["--model", "MAP", "--optimizer", "noisy_adam"], "use --optimizer adam or sgd"),
        (["--model", "MAP", "--optimizer", "vogn"], "use --optimizer adam or sgd"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--initial_size", "100"], "--initial_size 100 does not match MNIST"),
        (["--dataset", "CIFAR10", "--initial_size", "784"], "3x32x32 = 3072"),
        (["--label_size", "5"], "--label_size 5"),
        (["--subset", "0"], "--subset"),
        (["--subset", "60001"], "--subset"),
        (["--dataset", "CIFAR10", "--subset", "50001"], "50000"),
        (["--augment"], "CIFAR10"),
        (["--hidden", "0"], "hidden sizes"),
        (["--hidden", "a,b"], "hidden sizes"),
        (["--arch", "resnet20", "--hidden", "50"], "does not apply to --arch resnet20; drop --hidden"),
        (["--arch", "covnet", "--hidden", "50"], "does not apply to --arch covnet"),
        (["--model", "MAP", "--norm_posterior", "point"],
         "--norm_posterior is not an option of --optimizer adam; drop --norm_posterior, or use --optimizer noisy_adam "
         "or vogn (--model FFG) or noisy_kfac (--model MVG)"),
        (["--model", "MAP", "--prior_var", "auto"], "--prior_var is not an option of --optimizer adam"),
        (["--model", "MAP", "--prior_every", "5"], "--prior_every is not an option of --optimizer adam"),
        (["--prior_every", "5"], "add --prior_var auto or drop --prior_every"),
        (["--kfac_structure", "block_tridiagonal"], "--kfac_structure is not an option of --optimizer noisy_adam"),
        (["--eps", "1e-8"], "--eps is not an option of --optimizer noisy_adam; drop --eps, or use --optimizer adam "
                            "(--model MAP)"),
        (["--norm_posterior", "laplace"], "invalid choice"),
        (["--train_samples", "0"], "--train_samples"),
        (["--test_samples", "-1"], "--test_samples"),
        (["--prior_var", "0"], "--prior_var"),
        (["--damping", "-1"], "--damping"),
        (["--momentum", "1"], "--momentum/--beta2 must lie in [0, 1), got (1.0, 0.9999)"),
        (["--beta2", "1"], "--momentum/--beta2 must lie in [0, 1), got (0.9, 1.0)"),
        (["--model", "MVG", "--t_inv", "0"], "--t_stats and --t_inv must be >= 1, got 10, 0 (--optimizer noisy_kfac)"),
        (["--model", "MVG", "--kfac_rank", "0"], "--kfac_rank must be None or a positive integer"),
        (["--model", "MVG", "--kfac_conv_stride", "0"], "--kfac_conv_stride must be >= 1, got 0"),
        (["--model", "MVG", "--kfac_rank", "8", "--damping_mode", "exact"],
         "--kfac_rank must be None or a positive integer with --damping_mode factored, got 8 with 'exact'"),
        (["--model", "MVG", "--kfac_structure", "block_tridiagonal", "--kfac_rank", "8"],
         "--kfac_structure block_tridiagonal needs --damping_mode factored and no --kfac_rank"),
        (["--model", "MVG", "--kl_clip", "-1"], "--kl_clip must be positive"),
        (["--model", "MVG", "--beta2", "0.9"], "--beta2 is not an option of --optimizer noisy_kfac"),
        (["--model", "MVG", "--fisher", "hessian"], "--fisher must be 'example' (the data's labels) or 'true'"),
        (["--optimizer", "vogn", "--fisher", "true"], "got 'true' (--optimizer vogn)"),
        (["--kl_weight", "0"], "--kl_weight must be positive, got 0.0 (--optimizer noisy_adam)"),
        (["--init_precision", "0"], "--init_precision must be positive"),
        (["--warm_start", "true", "--fisher", "hessian"], "use --fisher example or --fisher batch"),
        (["--warm_start", "maybe"], "invalid value 'maybe'; use true or false"),
        (["--model", "MAP", "--eps", "0"], "--eps must be positive, got 0.0 (--optimizer adam)"),
        (["--model", "MAP", "--optimizer", "sgd", "--momentum", "1"], "--momentum must lie in [0, 1)"),
        (["--lr_schedule", "linear"], "invalid choice"),
        (["--lr_step", "0"], "--lr_step"),
        (["--log_interval", "0"], "--log_interval"),
        (["--num_threads", "0"], "--num_threads"),
        (["--dist_timeout", "0"], "--dist_timeout must be a positive number of seconds"),
        (["--dist_timeout", "inf"], "--dist_timeout must be a positive number of seconds"),
        (["--n", "0"], "--n"),
        (["--name", "a/b"], "--name"),
        (["--resume"], "--resume"),
    ],
)
def test_train_errors(capsys: pytest.CaptureFixture, tmp_path: Path, argv: list[str], needle: str) -> None:
    line = fails(capsys, TrainOptions().parse, argv + ["--ckpt_dir", str(tmp_path)])
    assert needle in line


def test_cli_error_is_one_line_without_traceback() -> None:
    code = "from option_parser import TrainOptions; TrainOptions().parse()"  # python -c puts cwd on sys.path
    proc = subprocess.run(
        [sys.executable, "-c", code, "--model", "MVG", "--optimizer", "vogn"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: --model MVG cannot be trained with --optimizer vogn (vogn trains --model FFG); "
        "use --optimizer noisy_kfac"
    ]


def test_resume_needs_checkpoint(tmp_path: Path) -> None:
    save_atomic({"a": 1}, tmp_path / "MNIST_FFG_noisy_adam_mlp" / "epoch_3.pt")
    o = train("--resume", "--ckpt_dir", str(tmp_path))
    assert o.resume and o.run_dir == str(tmp_path / "MNIST_FFG_noisy_adam_mlp")


# ---------------------------------------------------------------------------
# printing / saving


def test_save_options(tmp_path: Path) -> None:
    o = train("--model", "MVG", "--hidden", "400,400", "--ckpt_dir", str(tmp_path))
    save_options(o, o.run_dir)
    run = Path(o.run_dir)
    saved = json.loads((run / "opt.json").read_text())
    assert saved == json.loads(json.dumps(vars(o)))
    assert saved["hidden"] == [400, 400] and saved["optimizer"] == "noisy_kfac"
    txt = (run / "opt.txt").read_text()
    assert txt.startswith("----------------- Options ---------------\n")
    assert txt.rstrip().endswith("----------------- End -------------------")
    model_line = next(line for line in txt.splitlines() if line.strip().startswith("model:"))
    assert "MVG" in model_line and "[default: FFG]" in model_line
    bs_line = next(line for line in txt.splitlines() if line.strip().startswith("batch_size:"))
    assert "[default" not in bs_line
    assert format_options(o) + "\n" == txt


# ---------------------------------------------------------------------------
# test options


def _run(root: Path, name: str, epochs: list[int], mtime: float, **opts) -> Path:
    run = root / name
    for e in epochs:
        save_atomic({"e": e}, run / f"epoch_{e}.pt")
        os.utime(run / f"epoch_{e}.pt", (mtime + e, mtime + e))
    o = TrainOptions().parse([f"--{k}={v}" for k, v in opts.items()] + ["--name", name, "--ckpt_dir", str(root)])
    save_options(o, run)
    return run


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    _run(tmp_path, "ffg", [1, 2, 3], 1_000_000, model="FFG", hidden="50,50", dataset="FashionMNIST", epoch=3)
    _run(tmp_path, "mvg", [1, 5], 2_000_000, model="MVG", epoch=5)
    _run(tmp_path, "cifar", [2], 500_000, model="MAP", dataset="CIFAR10", data_root="/somewhere/data")
    return tmp_path


def test_test_options_latest_run_and_epoch(runs: Path) -> None:
    o = _TestOptions().parse(["--ckpt_dir", str(runs)])
    assert o.name == "mvg" and o.epoch == 5 and o.model == "MVG" and o.optimizer == "noisy_kfac"
    assert o.run_dir == str(runs / "mvg") and not o.is_train


def test_test_options_latest_of_model_takes_saved_options(runs: Path) -> None:
    o = _TestOptions().parse(["--ckpt_dir", str(runs), "--model", "FFG", "--test_samples", "3"])
    assert o.name == "ffg" and o.epoch == 3
    assert o.dataset == "FashionMNIST" and o.hidden == [50, 50] and o.optimizer == "noisy_adam"
    assert o.test_samples == 3 and o.n == 60000


def test_test_options_named_run_and_epoch(runs: Path) -> None:
    o = _TestOptions().parse(["--ckpt_dir", str(runs), "--name", "cifar", "--epoch", "2", "--batch_size", "7"])
    assert (o.model, o.optimizer, o.arch, o.dataset, o.initial_size) == ("MAP", "adam", "lenet5", "CIFAR10", 3072)
    assert o.epoch == 2 and o.eval_batch_size == 7  # --batch_size: test.py's alias of --eval_batch_size
    assert o.data_root == "/somewhere/data"  # inherited from the run...
    o = _TestOptions().parse(["--ckpt_dir", str(runs), "--name", "cifar", "--data_root", "x"])
    assert o.data_root == "x"  # ...unless given


def test_test_options_ood(runs: Path) -> None:
    o = _TestOptions().parse(["--ckpt_dir", str(runs), "--name", "ffg", "--ood_dataset", "MNIST"])
    assert o.ood_dataset == "MNIST"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--name", "nope"], "runs with checkpoints: mvg, ffg, cifar"),
        (["--name", "mvg", "--epoch", "3"], "available: 1, 5"),
        (["--epoch", "0"], "--epoch"),
        (["--model", "MAP", "--name", "ffg"], "trained with --model FFG"),
        (["--name", "ffg", "--hidden", "100"], "trained with --hidden 50,50"),
        (["--name", "ffg", "--dataset", "MNIST"], "--ood_dataset"),
        (["--name", "ffg", "--ood_dataset", "FashionMNIST"], "must differ"),
        (["--name", "ffg", "--ood_dataset", "CIFAR10"], "choose MNIST"),
        (["--name", "cifar", "--ood_dataset", "MNIST"], "another data set"),
    ],
)
def test_test_options_errors(capsys: pytest.CaptureFixture, runs: Path, argv: list[str], needle: str) -> None:
    line = fails(capsys, _TestOptions().parse, argv + ["--ckpt_dir", str(runs)])
    assert needle in line


def test_test_options_no_runs(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    line = fails(capsys, _TestOptions().parse, ["--ckpt_dir", str(tmp_path)])
    assert "no run with checkpoints" in line and "train" in line
    line = fails(capsys, _TestOptions().parse, ["--ckpt_dir", str(tmp_path), "--model", "MVG"])
    assert "--model MVG" in line


def test_run_cli_turns_user_error_into_one_line(capsys: pytest.CaptureFixture) -> None:
    from util.errors import UserError, run_cli

    def main(argv: list[str] | None) -> None:
        raise UserError("first line\n  second line")

    assert run_cli(main, []) == 2
    assert capsys.readouterr().err == "error: first line second line\n"
    assert run_cli(lambda argv: None, []) == 0


@pytest.mark.parametrize("optimizer", ["noisy_adam", "vogn"])
def test_beta2_and_fisher_reach_the_diagonal_optimizers(optimizer: str) -> None:
    o = train("--optimizer", optimizer)
    opt = make_optimizer(o, make_model(o))
    assert opt.param_groups[0]["betas"][1] == optimizer_defaults(optimizer)["beta2"]
    assert opt.param_groups[0]["fisher"] == optimizer_defaults(optimizer)["fisher"]
    o = train("--optimizer", optimizer, "--beta2", "0.5", "--fisher", "hessian")
    opt = make_optimizer(o, make_model(o))
    assert opt.param_groups[0]["betas"][1] == 0.5 and opt.param_groups[0]["fisher"] == "hessian"
