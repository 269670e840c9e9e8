"""The commands as the README shows them, on real MNIST.

One Noisy Adam run (``python train.py --model=FFG --dataset=MNIST --epoch=11`` on 100 images, 2 steps an epoch, in
IVON's regime so that the posterior is narrow, started from a folder of its own with ``$DATA_ROOT`` set and the
default ``--ckpt_dir``), then:

* ``test.py --epoch=N`` for N = 1, 2, 3 while epochs up to 11 exist, and ``test.py`` with no ``--epoch``, all with
  ``--test_samples 0`` (the mean weights, deterministic): each reports exactly the numbers of ``epoch_N.pt``
  (resp. ``epoch_11.pt``) as computed here by a numpy forward pass from the state dict, with the documented
  normalisation and metrics (ECE over 15 bins) written here. The epochs' figures differ from each other by far more
  than the tolerance, so a ``test.py`` that evaluated another checkpoint fails; eleven epochs put ``9`` last in a
  lexicographic sort of the file names.
* ``test.py --epoch=3`` with the default 10 weight samples, and the command ``train.py`` prints at its end: their
  Monte-Carlo figures differ from the mean weights' and are nearest to those of the epoch asked for (nothing is
  assumed about how the weight samples are drawn).
* ``test.py --epoch=12``: one ``error:`` line listing the epochs that exist, exit status 2.
* ``--resume`` on a copy of the run without ``epoch_11.pt``: continues from epoch 10 (the checkpoints and
  ``metrics.jsonl`` records of epochs 1-10, wall-clock times included, stay as they were) and ends bit-identical to
  the uninterrupted run.

* The command train.py prints for a run under ``--ckpt_dir`` names that folder, so it finds the run from elsewhere.

``train.py``, the resume, the printed command and the missing epoch run as scripts in subprocesses; the other
``test.py`` commands call its ``main`` with the same arguments in this process (starting torch costs more than
evaluating).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_checkpoint, run_test_py

import train
from option_parser import TestOptions as _TestOptions  # "Test*" names would be collected by pytest
from option_parser import TrainOptions, save_options

REPO = Path(__file__).resolve().parent.parent
NAME = "MNIST_FFG_noisy_adam_mlp"  # the documented default name of this command's run
EPOCHS = 11
#: IVON's regime: a narrow posterior (sigma about 0.004), so that an epoch's Monte-Carlo figures sit nearest its own
NARROW = ["--lr", "0.1", "--beta2", "0.99999", "--init_precision", "6e4"]
TRAIN = ["train.py", "--model=FFG", "--dataset=MNIST", f"--epoch={EPOCHS}", "--subset", "100", "--batch_size", "50",
         "--hidden", "16", "--n", "60000", *NARROW, "--test_samples", "0", "--num_threads", "1", "--no_visdom"]
TEST = ["test.py", "--num_threads", "1"]
#: MNIST's documented normalisation (tests/test_documented_values.py checks it against the training images)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
ECE_BINS = 15
#: test.py (float32) against the float64 recomputation; neighbouring epochs differ by 1e-2 or more
TOL = {"test_acc": 2e-4, "test_nll": 1e-4, "test_ece": 2e-4}


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``python <script> ...`` with the repository's script, from ``cwd`` (where the run's folder is)."""
    script, *args = cmd
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


class Commands:
    """The run's folders and every command's result, by key."""

    def __init__(self, root: Path, data_root: Path) -> None:
        self.work, self.resumed = root / "work", root / "resumed"
        self.work.mkdir()
        self.env = dict(os.environ, DATA_ROOT=str(data_root), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.data_root = data_root
        self.procs: dict[str, subprocess.CompletedProcess] = {}
        self.before_resume: dict[int, os.stat_result] = {}

    @property
    def run_dir(self) -> Path:
        return self.work / "checkpoints" / NAME

    @property
    def resumed_dir(self) -> Path:
        return self.resumed / "checkpoints" / NAME

    def ok(self, key: str) -> str:
        proc = self.procs[key]
        assert proc.returncode == 0, f"{key}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    def result(self, key: str) -> dict:
        """test.py's JSON line (its last line), checked against the lines it prints for people."""
        lines = self.ok(key).strip().splitlines()
        result = json.loads(lines[-1])
        text = "\n".join(lines[:-1])
        shown = {"test_acc": (r"test accuracy\s+([\d.]+)%", 100, 2), "test_nll": (r"test log loss\s+([\d.]+)", 1, 4),
                 "test_ece": (r"test ECE\s+([\d.]+)", 1, 4)}
        for k, (pattern, scale, digits) in shown.items():
            m = re.search(pattern, text)
            assert m, f"{key}: no {k} line in\n{text}"
            assert m.group(1) == f"{scale * result[k]:.{digits}f}", (key, k, m.group(1), result[k])
        return result


@pytest.fixture(scope="module")
def commands(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Commands:
    c = Commands(tmp_path_factory.mktemp("commands"), data_root)
    c.procs["train"] = _run(TRAIN, c.work, c.env)
    c.ok("train")
    shutil.copytree(c.work / "checkpoints", c.resumed / "checkpoints")
    (c.resumed_dir / f"epoch_{EPOCHS}.pt").unlink()
    c.before_resume = {e: (c.resumed_dir / f"epoch_{e}.pt").stat() for e in range(1, EPOCHS)}
    printed = c.procs["train"].stdout.strip().splitlines()[-1].split("evaluate with: ", 1)[-1]
    assert printed.startswith("python test.py "), printed
    scripts = {  # the real scripts, as a user starts them
        "printed": (shlex.split(printed)[1:] + ["--num_threads", "1"], c.work),
        "missing": (TEST + [f"--epoch={EPOCHS + 1}"], c.work),
        "resume": (TRAIN + ["--resume"], c.resumed),
    }
    in_process = {f"epoch_{n}": [f"--epoch={n}", "--test_samples", "0"] for n in (1, 2, 3)}
    in_process |= {"latest": ["--test_samples", "0"], "mc_epoch_3": ["--epoch=3"]}
    with ThreadPoolExecutor(2) as pool:
        futures = {k: pool.submit(_run, cmd, cwd, c.env) for k, (cmd, cwd) in scripts.items()}
        for key, argv in in_process.items():
            c.procs[key] = run_test_py(argv, c.work)
    c.procs |= {k: f.result() for k, f in futures.items()}
    return c


# -- the independent recomputation ------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format: big-endian magic with the rank in its last byte, then the sizes)."""
    raw = path.read_bytes()
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def reference_metrics(state: dict[str, torch.Tensor], images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, log loss and 15-bin ECE of the MLP ``fc1 - relu - fc2`` at the state dict's means, in float64."""
    x = (images.reshape(len(images), -1).astype(np.float64) / 255 - MNIST_MEAN) / MNIST_STD
    w = {k: v.double().numpy() for k, v in state.items()}
    logits = np.maximum(x @ w["fc1.weight"].T + w["fc1.bias"], 0) @ w["fc2.weight"].T + w["fc2.bias"]
    shifted = logits - logits.max(1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    p = np.exp(log_p)
    conf, correct = p.max(1), (p.argmax(1) == labels).astype(np.float64)
    ece = 0.0
    for b in range(ECE_BINS):  # bin b: confidence in (b/15, (b+1)/15]
        sel = (conf > b / ECE_BINS) & (conf <= (b + 1) / ECE_BINS)
        ece += abs(correct[sel].sum() - conf[sel].sum()) / len(labels)
    return {"test_acc": correct.mean(), "test_nll": -log_p[np.arange(len(labels)), labels].mean(), "test_ece": ece}


@pytest.fixture(scope="module")
def recomputed(commands: Commands) -> dict[int, dict[str, float]]:
    """Every epoch's mean-weight figures, from its ``epoch_N.pt``."""
    raw = commands.data_root / "MNIST" / "raw"
    images, labels = read_idx(raw / "t10k-images-idx3-ubyte"), read_idx(raw / "t10k-labels-idx1-ubyte")
    out = {}
    for epoch in range(1, EPOCHS + 1):
        ckpt = torch.load(commands.run_dir / f"epoch_{epoch}.pt", map_location="cpu", weights_only=False)
        out[epoch] = reference_metrics(ckpt["model"], images, labels.astype(np.int64))
    return out


def assert_reports(got: dict, ref: dict, what: str) -> None:
    for key, tol in TOL.items():
        assert abs(got[key] - ref[key]) <= tol, f"{what}: {key} {got[key]:.6f}, epoch_N.pt gives {ref[key]:.6f}"


@pytest.mark.slow
def test_epochs_can_be_told_apart(recomputed: dict[int, dict[str, float]]) -> None:
    """Every pair of epochs differs, in NLL, by far more than the tolerance (else the tests below prove nothing)."""
    nll = sorted(r["test_nll"] for r in recomputed.values())
    assert min(b - a for a, b in zip(nll, nll[1:])) > 20 * TOL["test_nll"], nll


@pytest.mark.slow
@pytest.mark.parametrize("epoch", [1, 2, 3])
def test_epoch_n_reports_that_checkpoint(commands: Commands, recomputed: dict, epoch: int) -> None:
    got = commands.result(f"epoch_{epoch}")
    assert (got["epoch"], got["name"], got["test_samples"]) == (epoch, NAME, 0)
    assert f"{NAME} epoch {epoch} (checkpoints/{NAME}/epoch_{epoch}.pt), predictive over mean weights:" \
        in commands.procs[f"epoch_{epoch}"].stdout
    assert_reports(got, recomputed[epoch], f"test.py --epoch={epoch}")


@pytest.mark.slow
def test_no_epoch_evaluates_the_latest(commands: Commands, recomputed: dict) -> None:
    got = commands.result("latest")
    assert got["epoch"] == EPOCHS
    assert_reports(got, recomputed[EPOCHS], "test.py without --epoch")


def nearest_epoch(got: dict, recomputed: dict[int, dict[str, float]]) -> int:
    return min(recomputed, key=lambda e: abs(recomputed[e]["test_nll"] - got["test_nll"]))


@pytest.mark.slow
@pytest.mark.parametrize(("key", "epoch"), [("mc_epoch_3", 3), ("printed", EPOCHS)])
def test_monte_carlo_predictive_of_the_epoch_asked_for(commands: Commands, recomputed: dict, key: str,
                                                        epoch: int) -> None:
    """The default predictive (10 weight samples) of ``--epoch=3`` and of the command train.py prints at the end: not
    the mean weights' figures, and nearest to that epoch's (the posterior is narrow: sigma about 0.004)."""
    got = commands.result(key)
    assert (got["epoch"], got["test_samples"]) == (epoch, 10)
    assert "predictive over 10 weight samples" in commands.procs[key].stdout
    assert abs(got["test_nll"] - recomputed[epoch]["test_nll"]) > 1e-5, "the mean weights, not weight samples"
    assert nearest_epoch(got, recomputed) == epoch


@pytest.mark.slow
def test_missing_epoch_is_one_line_listing_the_epochs(commands: Commands) -> None:
    proc = commands.procs["missing"]
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    line = proc.stderr.strip()
    listed = ", ".join(map(str, range(1, EPOCHS + 1)))
    assert line.startswith("error: ") and f"epoch {EPOCHS + 1}" in line and listed in line, line
    assert "--epoch" in line, f"the error does not say what to pass: {line}"


@pytest.mark.slow
def test_resume_continues_from_the_latest_epoch(commands: Commands) -> None:
    out = commands.ok("resume")
    assert f"resuming {NAME} from epoch {EPOCHS - 1}" in out
    run, resumed = commands.run_dir, commands.resumed_dir
    for epoch, before in commands.before_resume.items():  # epochs 1-10 are not trained (or written) again
        after = (resumed / f"epoch_{epoch}.pt").stat()
        assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns,
                                                                     before.st_size), f"epoch_{epoch}.pt rewritten"
    lines, lines_resumed = ((d / "metrics.jsonl").read_text().splitlines() for d in (run, resumed))
    assert len(lines) == len(lines_resumed) == EPOCHS  # one record per epoch (fewer steps than --log_interval)
    assert lines_resumed[:-1] == lines[:-1], "the records of epochs 1-10 changed: they were trained again"
    last, last_resumed = json.loads(lines[-1]), json.loads(lines_resumed[-1])
    assert last.pop("sec_per_epoch") >= 0 and last_resumed.pop("sec_per_epoch") >= 0
    assert last == last_resumed
    a, b = (torch.load(d / f"epoch_{EPOCHS}.pt", map_location="cpu", weights_only=False) for d in (run, resumed))
    assert (a["epoch"], a["iteration"]) == (b["epoch"], b["iteration"]) == (EPOCHS, 2 * EPOCHS)
    assert_same_checkpoint(a, b)


def test_printed_command_names_the_runs_ckpt_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run under ``--ckpt_dir`` (a name with a space): the command train.py prints finds it from another folder."""
    opt = TrainOptions().parse(["--ckpt_dir", str(tmp_path / "my runs"), "--name", "run 1", "--epoch", "3",
                                "--data_root", str(tmp_path), "--device", "cpu"])
    save_options(opt, opt.run_dir)
    (Path(opt.run_dir) / "epoch_3.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    python, script, *argv = shlex.split(train.evaluate_command(opt))
    assert (python, script) == ("python", "test.py")
    got = _TestOptions().parse([*argv, "--device", "cpu"])
    assert (got.run_dir, got.epoch) == (opt.run_dir, 3)
