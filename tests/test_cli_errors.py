"""Bad input at the command line: ``python train.py`` / ``python test.py`` in subprocesses.

Each case must end with exit status 2 and exactly one stderr line, ``error: <what to do>``, and
no traceback (``test_options.py`` checks the same flags in-process; here the real scripts run).
Covered: bad flag values (``--optimizer rmsprop``, ``--batch_size 0``, a negative ``--lr``), a flag of another
optimizer, ``--device cuda`` without CUDA, ``--model MVG --optimizer vogn``, missing data (the download fails),
a truncated IDX data file, a data file of the wrong image size, ``--resume`` with nothing to
resume, and checkpoints that are truncated, random bytes, from another model or of an older
format.

The data are tiny MNIST-format files; the runs' checkpoints are written here in-process the
way ``train.py`` writes them. Start-up (importing torch) is most of a case's cost, so the cases that need no
environment of their own run one after another in one interpreter, each as ``python SCRIPT ARGS`` would
(``runpy`` with ``__name__ == "__main__"``, its own ``sys.argv``, stdout and stderr, the exit status its
``SystemExit``, and any exception that escapes printed as the interpreter would); ``OWN_PROCESS`` and the cases
with an environment each start their own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, write_fake_mnist, write_idx

from experiment import make_model, make_optimizer, make_scheduler
from option_parser import TrainOptions, save_options
from util.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_atomic
from util.errors import UserError

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    script: str
    argv: tuple[str, ...]
    expected: str  # a substring of the error line
    env: tuple[tuple[str, str], ...] = ()
    preamble: str | None = None  # the start of lines allowed before the error line


def _cases(root: Path) -> dict[str, Case]:
    ckpt, data = root / "ckpt", root / "data"
    good = ("--ckpt_dir", str(ckpt), "--data_root", str(data / "good"), "--no_visdom", "--no_progress",
            "--device", "cpu")
    run = str(ckpt / "truncated" / "epoch_1.pt")
    t10k = str(data / "truncated" / "MNIST" / "raw" / "t10k-images-idx3-ubyte")
    train_images = str(data / "wrong_size" / "MNIST" / "raw" / "train-images-idx3-ubyte")
    return {
        # -- train.py: flags ---------------------------------------------------------------
        "train_bad_choice": Case("train.py", ("--optimizer", "rmsprop", *good),
                                 "argument --optimizer: invalid choice: 'rmsprop'"),
        "train_batch_size_0": Case("train.py", ("--batch_size", "0", *good),
                                   "error: --batch_size must be a positive integer, got 0"),
        "train_eval_batch_size_0": Case("train.py", ("--eval_batch_size", "0", *good),
                                        "error: --eval_batch_size must be a positive integer (omit it for the "
                                        "device's default), got 0"),
        "train_negative_lr": Case("train.py", ("--lr", "-0.01", *good),
                                  "error: --lr must be positive, got -0.01 (--optimizer noisy_adam)"),
        "train_flag_of_another_optimizer": Case(
            "train.py", ("--model", "MVG", "--beta2", "0.9", *good),
            "error: --beta2 is not an option of --optimizer noisy_kfac; drop --beta2, or use --optimizer noisy_adam or "
            "vogn (--model FFG)"),
        "train_cuda_without_cuda": Case(
            "train.py", (*good, "--device", "cuda"),
            "error: --device cuda: CUDA is not available on this machine; use --device cpu or auto",
            env=(("CUDA_VISIBLE_DEVICES", ""),)),
        "train_mvg_with_vogn": Case(
            "train.py", ("--model", "MVG", "--optimizer", "vogn", *good),
            "error: --model MVG cannot be trained with --optimizer vogn (vogn trains --model FFG); "
            "use --optimizer noisy_kfac"),
        "train_hidden_with_resnet20": Case(
            "train.py", ("--arch", "resnet20", "--hidden", "50", *good),
            "error: --hidden sets the mlp's hidden sizes and does not apply to --arch resnet20; "
            "drop --hidden or use --arch mlp"),
        "train_resume_nothing": Case("train.py", ("--resume", "--name", "nothing", *good),
                                     f"error: --resume: no checkpoints in {ckpt / 'nothing'}; drop --resume"),
        # -- train.py: data ----------------------------------------------------------------
        "train_missing_data": Case(
            "train.py", ("--ckpt_dir", str(ckpt), "--data_root", str(data / "empty"), "--no_visdom"),
            "error: MNIST data not found (download failed: ", preamble="downloading MNIST to "),
        "train_truncated_idx": Case(
            "train.py", ("--ckpt_dir", str(ckpt), "--data_root", str(data / "truncated"), "--no_visdom"),
            f"error: data file {t10k} is corrupted or truncated (100 bytes; "),
        "train_wrong_image_size": Case(
            "train.py", ("--ckpt_dir", str(ckpt), "--data_root", str(data / "wrong_size"), "--no_visdom"),
            f"error: data file {train_images} has images of shape (20, 32, 32), expected N x 28 x 28 uint8"),
        # -- train.py --resume: checkpoints --------------------------------------------------
        "train_resume_truncated": Case("train.py", ("--resume", "--name", "truncated", *good),
                                       f"error: checkpoint {run} is corrupted ("),
        "train_resume_other_model": Case(
            "train.py", ("--resume", "--name", "other_model", *good),
            f"error: checkpoint {ckpt / 'other_model' / 'epoch_1.pt'} does not fit this run's model/optimizer ("),
        # -- test.py -----------------------------------------------------------------------
        "test_missing_checkpoint": Case("test.py", ("--ckpt_dir", str(ckpt), "--name", "good", "--epoch", "3"),
                                        "error: run 'good' has no checkpoint for epoch 3; available: 1"),
        "test_batch_size_0": Case("test.py", ("--ckpt_dir", str(ckpt), "--name", "good", "--batch_size", "0"),
                                  "error: --eval_batch_size must be a positive integer (omit it for the device's "
                                  "default), got 0"),
        "test_random_bytes": Case("test.py", ("--ckpt_dir", str(ckpt), "--name", "random"),
                                  f"error: checkpoint {ckpt / 'random' / 'epoch_1.pt'} is corrupted ("),
        "test_other_model": Case(
            "test.py", ("--ckpt_dir", str(ckpt), "--name", "other_model"),
            f"error: checkpoint {ckpt / 'other_model' / 'epoch_1.pt'} does not match a FFG mlp for MNIST ("),
        "test_old_format": Case(
            "test.py", ("--ckpt_dir", str(ckpt), "--name", "old_format"),
            f"error: checkpoint {ckpt / 'old_format' / 'epoch_1.pt'} has format_version 0 but this code reads "
            f"format {CHECKPOINT_FORMAT}"),
    }


def _write_run(ckpt: Path, name: str, data_root: Path, *flags: str, **overrides) -> Path:
    """A run folder with ``opt.json`` and an ``epoch_1.pt`` laid out like train.py's."""
    opt = TrainOptions().parse(["--ckpt_dir", str(ckpt), "--name", name, "--data_root", str(data_root),
                                "--device", "cpu", *flags])
    torch.manual_seed(0)
    model = make_model(opt)
    optimizer = make_optimizer(opt, model)
    scheduler = make_scheduler(opt, optimizer)
    run_dir = Path(opt.run_dir)
    save_options(opt, run_dir)
    state = {"format_version": CHECKPOINT_FORMAT, "epoch": 1, "iteration": 1, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": [{"torch": torch.get_rng_state()}],
             "options": {k: v for k, v in vars(opt).items() if k != "explicit"}, "metrics": {}}
    save_atomic({**state, **overrides}, run_dir / "epoch_1.pt")
    return run_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data roots and checkpoint runs, good and bad, under one folder."""
    root = tmp_path_factory.mktemp("cli")
    data, ckpt = root / "data", root / "ckpt"
    write_fake_mnist(data / "good")
    write_fake_mnist(data / "truncated")
    t10k = data / "truncated" / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    t10k.write_bytes(t10k.read_bytes()[:100])
    write_fake_mnist(data / "wrong_size")
    write_idx(data / "wrong_size" / "MNIST" / "raw" / "train-images-idx3-ubyte",
              np.random.default_rng(0).integers(0, 256, (20, 32, 32)))
    (data / "empty").mkdir()

    _write_run(ckpt, "good", data / "good")
    for name in ("truncated", "random", "other_model", "old_format"):
        shutil.copytree(ckpt / "good", ckpt / name)
    path = ckpt / "truncated" / "epoch_1.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (ckpt / "random" / "epoch_1.pt").write_bytes(np.random.default_rng(1).bytes(4096))
    other = _write_run(ckpt, "other_tmp", data / "good", "--hidden", "50")  # same opt.json, other weights
    shutil.copyfile(other / "epoch_1.pt", ckpt / "other_model" / "epoch_1.pt")
    shutil.rmtree(other)
    save_atomic({**load_checkpoint(ckpt / "good" / "epoch_1.pt"), "format_version": 0},
                ckpt / "old_format" / "epoch_1.pt")
    return root


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


#: cases that also start an interpreter of their own, to show the exit status and stderr of a real process
OWN_PROCESS = ("train_bad_choice", "train_truncated_idx", "test_other_model")

#: runs ``[[script, argv], ...]`` (JSON on stdin) in turn in this interpreter; prints ``[[status, out, err], ...]``
SEQUENCE = """
import contextlib, io, json, os, runpy, sys, traceback
outcomes = []
for script, argv in json.load(sys.stdin):
    out, err, status = io.StringIO(), io.StringIO(), 0
    sys.argv, sys.path[0] = [script, *argv], os.path.dirname(script)  # as `python SCRIPT` sets them
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        except BaseException:
            traceback.print_exc()
            status = 1
    outcomes.append([status, out.getvalue(), err.getvalue()])
print(json.dumps(outcomes))
"""


@pytest.fixture(scope="module")
def results(setup: Path) -> dict[str, Result]:
    """Every case's outcome, run from an empty folder: the plain cases in one interpreter, the others alongside."""
    cwd = setup / "cwd"
    cwd.mkdir()
    proxy = f"http://127.0.0.1:{free_port()}"  # downloads fail at once, never reach the network
    base = {k: v for k, v in os.environ.items() if k not in ("DATA_ROOT", "NGVI_TEST_CRASH_BEFORE_RENAME")}
    base.update(HTTP_PROXY=proxy, HTTPS_PROXY=proxy, http_proxy=proxy, https_proxy=proxy, NO_PROXY="", no_proxy="")
    cases = _cases(setup)
    alone = {name: case for name, case in cases.items() if case.env or name in OWN_PROCESS}
    together = [name for name, case in cases.items() if not case.env]

    def run(case: Case) -> Result:
        proc = subprocess.run([sys.executable, str(REPO / case.script), *case.argv], cwd=cwd,
                              env={**base, **dict(case.env)}, capture_output=True, text=True, timeout=300)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def sequence() -> dict[str, Result]:
        jobs = [[str(REPO / cases[name].script), list(cases[name].argv)] for name in together]
        proc = subprocess.run([sys.executable, "-c", SEQUENCE], input=json.dumps(jobs), cwd=cwd, env=base,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return {name: Result(*outcome) for name, outcome in zip(together, json.loads(proc.stdout.splitlines()[-1]))}

    with ThreadPoolExecutor(max_workers=len(alone) + 1) as pool:
        together_outcomes = pool.submit(sequence)
        alone_outcomes = dict(zip(alone, pool.map(run, alone.values())))
        outcomes = together_outcomes.result()
    for name, result in alone_outcomes.items():
        outcomes[name if cases[name].env else f"{name} (own process)"] = result
    return outcomes


CASE_NAMES = list(_cases(Path()))  # the names; the paths come from `setup`


@pytest.mark.slow  # five interpreter starts
@pytest.mark.parametrize("case", CASE_NAMES + [f"{name} (own process)" for name in OWN_PROCESS])
def test_bad_input_is_one_error_line_exit_2(setup: Path, results: dict[str, Result], case: str) -> None:
    spec, result = _cases(setup)[case.removesuffix(" (own process)")], results[case]
    report = f"exit {result.returncode}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 2, report
    assert "Traceback" not in result.stderr, report
    lines = result.stderr.splitlines()
    assert lines and lines[-1].startswith("error: "), report
    assert all(spec.preamble and line.startswith(spec.preamble) for line in lines[:-1]), report
    assert spec.expected in lines[-1], report
    assert "usage:" not in result.stderr


def test_good_run_loads(setup: Path) -> None:
    """The corrupted cases above are copies of this run: it is a checkpoint test.py can use."""
    ckpt = load_checkpoint(setup / "ckpt" / "good" / "epoch_1.pt")
    opt = TrainOptions().parse(["--data_root", str(setup / "data" / "good"), "--device", "cpu"])
    make_model(opt).load_state_dict(ckpt["model"])


def test_image_size_too_small_for_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    """No built-in data set is too small for an architecture (all are >= 28x28), so this one is not
    reachable from the command line; make_model still turns it into a one-line UserError."""
    from data.datasets import DATASETS, DatasetInfo

    monkeypatch.setitem(DATASETS, "Tiny", DatasetInfo(1, 12, 10, 100, (0.5,), (0.5,)))
    opt = TrainOptions().parse(["--arch", "covnet", "--device", "cpu"])
    opt.dataset = "Tiny"
    with pytest.raises(UserError) as e:
        make_model(opt)
    assert str(e.value) == "covnet needs images of at least 16x16 pixels, got 12x12; choose another --arch"
