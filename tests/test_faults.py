"""Faults during a run, end to end: ``train.py`` in subprocesses on 2000 real MNIST images.

What the tests prove (each names, in its docstring, the protection it checks):

* SIGKILL mid-epoch, and a kill between writing a checkpoint's temp file and renaming it
  (``$NGVI_TEST_CRASH_BEFORE_RENAME=epoch_2.pt``): no truncated ``epoch_N.pt`` is ever left,
  ``--resume`` continues from the last good epoch and ends bit-identical to an uninterrupted run.
* A learning rate that diverges in epoch 2: one error line naming the epoch and the step, exit 2,
  and the last good checkpoint (epoch 1) holds only finite numbers.
* Disk full while writing a checkpoint: a tiny tmpfs where this process may mount one (ENOSPC),
  else a file-size limit (``RLIMIT_FSIZE``, EFBIG); both real OS-level write failures. One error
  line, exit 2, the previous checkpoint byte-for-byte intact, no temp file left.
* Visdom server absent, and killed mid-run: training completes and ``metrics.jsonl`` is complete.
* Determinism: the same ``--seed`` gives the same ``metrics.jsonl``; another seed other weights.

"Equal metrics" means every record and every field bit-identical (compared as JSON text) except
the wall-clock field ``sec_per_epoch``. Runs are on the CPU with ``--num_threads 1``.

Start-up (imports, reading MNIST) dominates each run, so the module fixture starts the runs in two
concurrent waves and the tests check what they left: wave 1 the uninterrupted runs and the first
half of the interrupted ones, wave 2 the ``--resume`` runs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import assert_same_checkpoint, free_port, tensors
from visdom_helpers import VisdomServer

from util.checkpoint import CRASH_ENV, list_epochs, load_checkpoint
from util.errors import UserError

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "train.py"
WALL_CLOCK = ("sec_per_epoch",)  # the only field allowed to differ between equal runs
EPOCHS = 3
# 100 steps of 20 images per epoch, an iteration record every 10 steps
FAST = ["--subset", "2000", "--batch_size", "20", "--epoch", str(EPOCHS), "--test_samples", "2",
        "--log_interval", "10", "--no_progress", "--num_threads", "1", "--device", "cpu"]

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- helpers


@dataclass
class Result:
    returncode: int | None
    stdout: str
    stderr: str

    def describe(self) -> str:
        return f"exit {self.returncode}\n--- stdout (tail)\n{self.stdout[-1500:]}\n--- stderr\n{self.stderr[-3000:]}"


class Train:
    """``train.py`` in a subprocess, its output to files (no pipe can fill up)."""

    def __init__(self, data_root: Path, ckpt_dir: Path, name: str, *extra: str, seed: int = 0,
                 env: dict | None = None, preexec_fn: Callable[[], None] | None = None) -> None:
        self.run_dir = ckpt_dir / name
        logs = ckpt_dir.parent / "logs"
        logs.mkdir(exist_ok=True)
        stem = logs / f"{name}.{time.monotonic_ns()}"
        self.out_path, self.err_path = stem.with_suffix(".out"), stem.with_suffix(".err")
        full_env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
        full_env.update(env or {})
        cmd = [sys.executable, str(TRAIN), "--data_root", str(data_root), "--ckpt_dir", str(ckpt_dir),
               "--name", name, "--seed", str(seed), *FAST, *extra]
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO, env=full_env, preexec_fn=preexec_fn)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 600) -> Result:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return Result(self.proc.returncode, self.out_path.read_text(), self.err_path.read_text())


def records(run_dir: Path) -> list[dict]:
    """The records of ``metrics.jsonl`` (a line cut by a kill is skipped)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def comparable(run_dir: Path) -> list[str]:
    """Each line of ``metrics.jsonl`` without the wall-clock fields, as JSON text (bit-exact floats)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.dumps({k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}) for line in lines]



def assert_same_state(run_a: Path, run_b: Path, epoch: int) -> None:
    """Model, optimizer, scheduler and RNG state of ``epoch_<epoch>.pt`` are bit-identical."""
    a, b = (load_checkpoint(r / f"epoch_{epoch}.pt") for r in (run_a, run_b))
    assert_same_checkpoint(a, b, ("epoch", "iteration", "scheduler", "model", "optimizer", "rng"))


def temp_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.endswith(".tmp"))


@dataclass
class Snapshot:
    """What a run left behind when it ended (taken before any ``--resume`` touches the folder)."""

    result: Result
    epochs: list[int]
    temp: list[str]
    records: list[dict]
    broken: list[str]  # files named like checkpoints that do not load


def snapshot(run: Train) -> Snapshot:
    result = run.wait()
    broken = []
    for path in sorted(run.run_dir.glob("epoch_*.pt")):
        try:
            load_checkpoint(path)
        except UserError as e:
            broken.append(f"{path.name}: {e}")
    temp = temp_files(run.run_dir) if run.run_dir.is_dir() else []
    return Snapshot(result, list_epochs(run.run_dir), temp, records(run.run_dir), broken)


def error_line(result: Result) -> str:
    """The single stderr line of a failed run; asserts exit 2, no traceback, nothing else."""
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.describe()
    return lines[0]


def _mount_tmpfs(where: Path, size: int) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, timeout=30)
    return proc.returncode == 0


def _limit_file_size(limit: int) -> Callable[[], None]:
    def preexec() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


# --------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Iterator[dict]:
    """All runs of this module, in two concurrent waves.

    Wave 1: ``reference`` (seed 0, no visdom server on its port), ``twin`` (seed 0, a visdom server
    that is killed after the first iteration record), ``seed1_diverging`` (seed 1; the LR is
    multiplied by 1e30 after epoch 1), ``crashed`` (killed by the test hook between writing
    ``epoch_2.pt``'s temp file and renaming it), ``killed`` (SIGKILL once epoch 2 has logged).
    Wave 2: ``--resume`` of ``killed`` and ``crashed``, and ``disk_full``: a resume from a copy of
    the reference's epoch 1 into a folder where ``epoch_2.pt`` does not fit.
    """
    root = tmp_path_factory.mktemp("faults")
    ckpt = root / "ckpt"
    out: dict = {}
    server = VisdomServer(root / "visdom")
    settled = threading.Event()  # set once the wait for the server is over, ready or not
    threading.Thread(target=lambda: (server.wait(120), settled.set()), daemon=True).start()
    disk = root / "disk"
    disk.mkdir()
    mounted = False
    started: list[Train] = []

    def train(*args: str, **kwargs) -> Train:
        started.append(Train(data_root, *args, **kwargs))
        return started[-1]

    try:
        wave1 = {
            "reference": train(ckpt, "reference", "--display_server", "http://127.0.0.1",
                               "--display_port", str(free_port())),
            "seed1_diverging": train(ckpt, "seed1_diverging", "--no_visdom", "--lr_schedule", "exponential",
                                     "--lr_decay", "1e30", seed=1),
            "crashed": train(ckpt, "crashed", "--no_visdom", env={CRASH_ENV: "epoch_2.pt"}),
            "killed": train(ckpt, "killed", "--no_visdom"),
        }
        killed, twin = wave1["killed"], None
        out["killed_at"] = out["server_killed_at"] = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if out["killed_at"] is None and killed.running():
                recs = records(killed.run_dir)
                if any(r["kind"] == "iter" and r["epoch"] == 2 for r in recs):
                    os.kill(killed.proc.pid, signal.SIGKILL)
                    out["killed_at"] = recs[-1]
            if twin is None and settled.is_set():
                twin = wave1["twin"] = train(ckpt, "twin", "--display_server", "http://127.0.0.1",
                                             "--display_port", str(server.port), "--env", "faults")
            if twin is not None and out["server_killed_at"] is None and twin.running():
                recs = records(twin.run_dir)
                if recs:
                    server.stop()
                    out["server_killed_at"] = recs[-1]
            twin_done = twin is not None and (out["server_killed_at"] is not None or not twin.running())
            if twin_done and not killed.running():
                break
            time.sleep(0.003)
        out["server_ready"] = server.ready.is_set()
        out["server_log"] = server.log_path
        server.stop()
        for key, run in wave1.items():
            out[key] = snapshot(run)
            out[f"{key}_dir"] = run.run_dir

        # -- wave 2 -----------------------------------------------------------------------
        wave2 = {}
        if out["killed"].result.returncode == -signal.SIGKILL:
            wave2["killed_resumed"] = train(ckpt, "killed", "--no_visdom", "--resume")
        if out["crashed"].result.returncode == 77:
            wave2["crashed_resumed"] = train(ckpt, "crashed", "--no_visdom", "--resume")
        reference = out["reference_dir"]
        keep = ["epoch_1.pt", "opt.json", "opt.txt", "metrics.jsonl"]
        if all((reference / f).is_file() for f in keep):
            size_1 = (reference / "epoch_1.pt").stat().st_size
            pages = sum(-(-(reference / f).stat().st_size // 4096) for f in keep) + 8
            preexec = None
            mounted = _mount_tmpfs(disk, pages * 4096 + size_1 // 2)
            if mounted:
                out["disk_full_reason"] = "No space left on device"
            else:  # not allowed to mount: a per-file size limit fails the write the same way
                preexec = _limit_file_size(size_1 // 2)
                out["disk_full_reason"] = "File too large"
            (disk / "full").mkdir()
            for f in keep:
                shutil.copyfile(reference / f, disk / "full" / f)
            out["disk_full_before"] = (disk / "full" / "epoch_1.pt").read_bytes()
            wave2["disk_full"] = train(disk, "full", "--no_visdom", "--resume", preexec_fn=preexec)
        for key, run in wave2.items():
            out[key] = snapshot(run)
            out[f"{key}_dir"] = run.run_dir
        yield out
    finally:
        for run in started:
            if run.running():
                run.proc.kill()
                run.proc.wait()
        server.stop()
        if mounted:
            subprocess.run(["umount", str(disk)], capture_output=True, timeout=30)


def finished(runs: dict, key: str) -> Snapshot:
    """The snapshot of a run that must have completed normally."""
    snap = runs.get(key)
    assert snap is not None, f"run {key} did not start (see the snapshots it depends on)"
    assert snap.result.returncode == 0, snap.result.describe()
    return snap


# --------------------------------------------------------------------------- kills


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(runs: dict) -> None:
    """Protection: checkpoints only at epoch ends, and ``--resume`` restoring model, optimizer,
    scheduler and RNG state and dropping the killed epoch's records from metrics.jsonl."""
    killed = runs["killed"]
    assert killed.result.returncode == -signal.SIGKILL, f"not killed mid-epoch 2:\n{killed.result.describe()}"
    assert runs["killed_at"]["epoch"] == 2
    assert killed.epochs == [1]  # killed inside epoch 2
    assert any(r["kind"] == "iter" and r["epoch"] == 2 for r in killed.records)
    assert not any(r["kind"] == "epoch" and r["epoch"] == 2 for r in killed.records)
    assert killed.temp == [] and killed.broken == []

    resumed = finished(runs, "killed_resumed")
    assert "resuming killed from epoch 1" in resumed.result.stdout
    assert resumed.epochs == [1, 2, 3] and resumed.broken == []
    assert comparable(runs["killed_dir"]) == comparable(runs["reference_dir"])
    assert_same_state(runs["killed_dir"], runs["reference_dir"], EPOCHS)


def test_kill_between_temp_write_and_rename_then_resume(runs: dict) -> None:
    """Protection: atomic checkpoint writes (temp file, fsync, rename), and only exact
    ``epoch_<N>.pt`` names count as checkpoints."""
    crashed = runs["crashed"]
    assert crashed.result.returncode == 77, crashed.result.describe()  # the hook's exit
    assert crashed.epochs == [1]
    assert crashed.broken == []
    assert len(crashed.temp) == 1 and crashed.temp[0].startswith(".epoch_2.pt."), crashed.temp
    assert [r["epoch"] for r in crashed.records if r["kind"] == "epoch"] == [1, 2]  # epoch 2 ran to the end

    resumed = finished(runs, "crashed_resumed")
    assert "resuming crashed from epoch 1" in resumed.result.stdout
    assert resumed.epochs == [1, 2, 3] and resumed.broken == []
    assert temp_files(runs["crashed_dir"]) == [], "--resume must clear the killed write's temp file"
    assert comparable(runs["crashed_dir"]) == comparable(runs["reference_dir"])
    assert_same_state(runs["crashed_dir"], runs["reference_dir"], EPOCHS)


# --------------------------------------------------------------------------- numerical faults


def test_divergence_stops_with_epoch_and_step_and_keeps_last_good_checkpoint(runs: dict) -> None:
    """Protection: every step's loss kept on the device and checked once per logging interval (the
    first non-finite step is named; backed by the finite-weights check at the end of each epoch),
    before anything of the diverged epoch is saved."""
    snap, run_dir = runs["seed1_diverging"], runs["seed1_diverging_dir"]
    line = error_line(snap.result)
    last_good = run_dir / "epoch_1.pt"
    assert line.startswith("error: training diverged at epoch 2, step "), line
    assert f"the last good checkpoint is {last_good}; lower --lr" in line
    assert snap.epochs == [1] and snap.broken == [] and snap.temp == []
    ckpt = load_checkpoint(last_good)
    for key, t in tensors(ckpt).items():
        if t.is_floating_point():
            assert torch.isfinite(t).all(), key
    assert all(math.isfinite(v) for v in ckpt["metrics"].values() if isinstance(v, float))
    text = (run_dir / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert [r["epoch"] for r in snap.records if r["kind"] == "epoch"] == [1]


# --------------------------------------------------------------------------- disk full


def test_disk_full_on_checkpoint_write_keeps_previous(runs: dict) -> None:
    """Protection: save_atomic turns a failed write (also torch.save's RuntimeError raised while
    handling the OSError) into one clear line, keeps the previous file and removes the temp file."""
    snap = runs.get("disk_full")
    assert snap is not None, "the reference run left no epoch 1 to resume from"
    run_dir = runs["disk_full_dir"]
    line = error_line(snap.result)
    assert line == (f"error: could not write checkpoint {run_dir / 'epoch_2.pt'} ({runs['disk_full_reason']}); "
                    "the previous checkpoint is intact; free disk space or choose a writable --ckpt_dir")
    assert snap.epochs == [1] and snap.temp == [] and snap.broken == []
    assert (run_dir / "epoch_1.pt").read_bytes() == runs["disk_full_before"]
    assert_same_state(run_dir, runs["reference_dir"], 1)


# --------------------------------------------------------------------------- visdom


def test_visdom_absent_training_completes(runs: dict) -> None:
    """Protection: Visualizer warns once and turns itself off when no server answers."""
    snap = finished(runs, "reference")
    lines = snap.result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: no visdom server at http://127.0.0.1:"), lines
    assert snap.epochs == [1, 2, 3]
    assert [(r["kind"], r["epoch"]) for r in snap.records] == [
        (kind, e) for e in (1, 2, 3) for kind in ["iter"] * 10 + ["epoch"]
    ]


def test_visdom_server_killed_mid_run(runs: dict) -> None:
    """Protection: Visualizer catches the lost connection, warns once and training goes on."""
    assert runs["server_ready"], f"visdom server did not start:\n{runs['server_log'].read_text()[-2000:]}"
    snap = finished(runs, "twin")
    killed_at = runs["server_killed_at"]
    assert killed_at is not None and (killed_at["kind"], killed_at["epoch"]) == ("iter", 1)
    lines = snap.result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: lost the visdom server at http://127.0.0.1:"), lines
    assert snap.epochs == [1, 2, 3]
    assert comparable(runs["twin_dir"]) == comparable(runs["reference_dir"])  # metrics.jsonl complete


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_metrics(runs: dict) -> None:
    """Protection: seeding of the initial weights, the weight noise, the subset and the batch order."""
    finished(runs, "reference")
    finished(runs, "twin")
    assert comparable(runs["twin_dir"]) == comparable(runs["reference_dir"])
    assert_same_state(runs["twin_dir"], runs["reference_dir"], EPOCHS)


def test_different_seed_gives_different_weights(runs: dict) -> None:
    """Protection: ``--seed`` reaches the initialization and the data (epoch 1 of the seed-1 run is
    ordinary: its LR only explodes from epoch 2)."""
    a = load_checkpoint(runs["reference_dir"] / "epoch_1.pt")["model"]
    b = load_checkpoint(runs["seed1_diverging_dir"] / "epoch_1.pt")["model"]
    means = [k for k in a if k.endswith((".weight", ".bias"))]
    assert means and a.keys() == b.keys()
    assert all(not torch.equal(a[k], b[k]) for k in means)
    first_a = next(r for r in runs["reference"].records if r["kind"] == "iter")
    first_b = next(r for r in runs["seed1_diverging"].records if r["kind"] == "iter")
    assert first_a["loss"] != first_b["loss"]
