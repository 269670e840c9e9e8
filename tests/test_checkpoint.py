"""Tests for util/checkpoint.py: atomic writes, crash safety, loading errors, run discovery."""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import util.checkpoint as ckpt
from util.checkpoint import (
    CHECKPOINT_FORMAT,
    latest_epoch,
    list_epochs,
    load_checkpoint,
    save_atomic,
    write_text_atomic,
)
from util.errors import UserError
from util.run_dir import latest_run

REPO = Path(__file__).resolve().parent.parent


def _state(value: float = 1.0) -> dict:
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, value)
    return {
        "epoch": 1,
        "model": model.state_dict(),
        "optimizer": {"state": {0: {"m": torch.ones(2)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "opt": {"model": "FFG", "hidden": [100], "prior_var": None},
        "rng": {"torch": torch.get_rng_state(), "python": list(np.random.get_state()[1][:3].tolist())},
    }


def _tmp_files(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


def test_roundtrip_adds_format_version(tmp_path: Path) -> None:
    state = _state(0.5)
    save_atomic(state, tmp_path / "run" / "epoch_1.pt")
    assert "format_version" not in state  # caller's dict untouched
    loaded = load_checkpoint(tmp_path / "run" / "epoch_1.pt")
    assert loaded["format_version"] == CHECKPOINT_FORMAT
    torch.testing.assert_close(loaded["model"]["weight"], torch.full((2, 3), 0.5))
    assert loaded["opt"] == state["opt"]
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    assert _tmp_files(tmp_path / "run") == []


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    path = tmp_path / "epoch_2.pt"
    save_atomic(_state(1.0), path)
    save_atomic(_state(2.0), path)
    assert load_checkpoint(path)["model"]["weight"][0, 0].item() == 2.0


@pytest.mark.parametrize("bad", [argparse.Namespace(a=1), np.zeros(3), np.float64(1.0), {1.5j: 1}, object()])
def test_save_refuses_non_plain_objects(tmp_path: Path, bad: object) -> None:
    with pytest.raises(TypeError):
        save_atomic({"x": bad}, tmp_path / "epoch_1.pt")
    assert list(tmp_path.iterdir()) == []


def test_list_epochs_only_counts_real_checkpoint_names(tmp_path: Path) -> None:
    save_atomic({"a": 1}, tmp_path / "epoch_3.pt")
    save_atomic({"a": 1}, tmp_path / "epoch_10.pt")
    for junk in ["epoch_4.pt.tmp", ".epoch_5.pt.abc123.tmp", "epoch_x.pt", "epoch_6.pth", "epoch_7.pt~", "opt.json"]:
        (tmp_path / junk).write_bytes(b"junk")
    (tmp_path / "epoch_8.pt").mkdir()
    assert list_epochs(tmp_path) == [3, 10]
    assert latest_epoch(tmp_path) == 10
    assert list_epochs(tmp_path / "missing") == [] and latest_epoch(tmp_path / "missing") is None


_CRASH_SCRIPT = """
import sys, torch
sys.path.insert(0, {repo!r})
from util.checkpoint import save_atomic
save_atomic({{"w": torch.full((4,), 2.0)}}, {path!r})
print("renamed")
"""


@pytest.mark.parametrize("target", ["epoch_1.pt", "epoch_2.pt"])
def test_kill_before_rename_leaves_previous_checkpoint(tmp_path: Path, target: str) -> None:
    save_atomic({"w": torch.full((4,), 1.0)}, tmp_path / "epoch_1.pt")
    env = dict(os.environ, NGVI_TEST_CRASH_BEFORE_RENAME="1")
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT.format(repo=str(REPO), path=str(tmp_path / target))],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 77, proc.stderr
    assert "renamed" not in proc.stdout
    leftovers = _tmp_files(tmp_path)
    assert len(leftovers) == 1  # the half-finished write is there...
    assert list_epochs(tmp_path) == [1]  # ...but is never taken for a checkpoint
    assert torch.equal(load_checkpoint(tmp_path / "epoch_1.pt")["w"], torch.full((4,), 1.0))


def test_disk_full_is_user_error_and_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "epoch_1.pt"
    save_atomic({"w": torch.ones(2)}, path)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", full)
    with pytest.raises(UserError) as e:
        save_atomic({"w": torch.zeros(2)}, path)
    msg = str(e.value)
    assert "could not write checkpoint" in msg and "No space left on device" in msg and "intact" in msg
    monkeypatch.undo()
    assert _tmp_files(tmp_path) == []
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(2))


def test_unwritable_dir_is_user_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="could not write checkpoint"):
        save_atomic({"a": 1}, blocker / "run" / "epoch_1.pt")  # parent is a file


def test_write_text_atomic(tmp_path: Path) -> None:
    write_text_atomic(tmp_path / "d" / "opt.txt", "héllo\n")
    write_text_atomic(tmp_path / "d" / "opt.txt", "second\n")
    assert (tmp_path / "d" / "opt.txt").read_text(encoding="utf-8") == "second\n"
    assert _tmp_files(tmp_path / "d") == []


def test_load_missing_lists_available(tmp_path: Path) -> None:
    for e in (1, 2, 5):
        save_atomic({"e": e}, tmp_path / f"epoch_{e}.pt")
    with pytest.raises(UserError) as e:
        load_checkpoint(tmp_path / "epoch_7.pt")
    assert "not found" in str(e.value) and "1, 2, 5" in str(e.value)
    with pytest.raises(UserError, match="no checkpoints in"):
        load_checkpoint(tmp_path / "empty" / "epoch_1.pt")


@pytest.mark.parametrize("how", ["truncated", "random", "empty"])
def test_load_corrupted(tmp_path: Path, how: str) -> None:
    save_atomic(_state(), tmp_path / "epoch_1.pt")
    save_atomic(_state(), tmp_path / "epoch_2.pt")
    path = tmp_path / "epoch_2.pt"
    content = path.read_bytes()
    path.write_bytes({"truncated": content[: len(content) // 2], "random": os.urandom(4096), "empty": b""}[how])
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert f"checkpoint {path} is corrupted" in msg and "available epochs" in msg and ": 1;" in msg
    assert "\n" not in msg


def test_load_not_a_dict(tmp_path: Path) -> None:
    torch.save([1, 2], tmp_path / "epoch_1.pt")
    with pytest.raises(UserError, match="corrupted"):
        load_checkpoint(tmp_path / "epoch_1.pt")


def test_load_format_mismatch(tmp_path: Path) -> None:
    save_atomic({"format_version": CHECKPOINT_FORMAT + 1, "a": 1}, tmp_path / "epoch_1.pt")
    with pytest.raises(UserError, match="format_version 2"):
        load_checkpoint(tmp_path / "epoch_1.pt")
    torch.save({"a": 1}, tmp_path / "epoch_2.pt")  # written without save_atomic
    with pytest.raises(UserError, match="format_version None"):
        load_checkpoint(tmp_path / "epoch_2.pt")


class _Payload:
    def __reduce__(self) -> tuple:
        return (os.system, ("touch pwned",))


def test_load_does_not_execute_pickled_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"format_version": 1, "x": _Payload()}, tmp_path / "epoch_1.pt")
    with pytest.raises(UserError):
        load_checkpoint(tmp_path / "epoch_1.pt")
    assert not (tmp_path / "pwned").exists()


def _make_run(root: Path, name: str, model: str, epochs: list[int], mtime: float) -> Path:
    run = root / name
    for e in epochs:
        save_atomic({"e": e}, run / f"epoch_{e}.pt")
        os.utime(run / f"epoch_{e}.pt", (mtime, mtime))
    run.mkdir(parents=True, exist_ok=True)
    (run / "opt.json").write_text(json.dumps({"model": model}))
    return run


def test_latest_run(tmp_path: Path) -> None:
    a = _make_run(tmp_path, "a", "FFG", [1, 2], 1_000_000)
    b = _make_run(tmp_path, "b", "MVG", [1], 2_000_000)
    _make_run(tmp_path, "c", "MAP", [], 3_000_000)  # no checkpoints: ignored
    (tmp_path / "stray.pt").write_bytes(b"")
    assert latest_run(tmp_path).path == b
    assert latest_run(tmp_path, "FFG").path == a
    assert latest_run(tmp_path, "MVG").path == b
    with pytest.raises(UserError, match="--model MAP"):
        latest_run(tmp_path, "MAP")
    os.utime(a / "epoch_2.pt", (3_000_000, 3_000_000))
    assert latest_run(tmp_path).path == a


def test_latest_run_none(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no run with checkpoints"):
        latest_run(tmp_path / "nothing")
