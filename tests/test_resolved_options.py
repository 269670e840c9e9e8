"""Every option resolved to the value the run uses, one home per default, and test.py reusing the run's options.

* The optimizer options default to the optimizer classes' own defaults (changing a class's default changes the
  option), and ``opt.json`` / ``opt.txt`` record values, not ``None``; ``explicit`` still lists typed flags.
* ``--kl_clip 0`` turns the trust region off; its help states the real default.
* test.py: training flags are a one-line error; an old run whose ``opt.json`` holds ``None`` still resolves.
* The ``docs/MATH.md`` sections the code cites exist.
* End to end (real MNIST, a few seconds): a run trained with ``--data_root`` is evaluated by ``test.py`` without
  it, from an empty folder without ``$DATA_ROOT``; output redirected to a file has no progress-bar updates.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from experiment import make_model, make_optimizer, optimizer_defaults
from optimizers import NoisyAdam, NoisyKFAC
from option_parser import TestOptions as _TestOptions  # "Test*" names would be collected by pytest
from option_parser import TrainOptions, save_options

REPO = Path(__file__).resolve().parent.parent


def train(*argv: str):
    return TrainOptions().parse([*argv, "--device", "cpu"])


@pytest.mark.parametrize("name", ["noisy_adam", "vogn", "noisy_kfac", "adam", "sgd"])
def test_every_option_the_optimizer_takes_is_resolved(name: str) -> None:
    model = {"noisy_adam": "FFG", "vogn": "FFG", "noisy_kfac": "MVG"}.get(name, "MAP")
    o = train("--model", model, "--optimizer", name)
    defaults = optimizer_defaults(name)
    assert "lr" in defaults and all(getattr(o, k) == v for k, v in defaults.items())
    assert o.explicit == ["device", "model", "optimizer"]
    opt = make_optimizer(o, make_model(o))
    group = opt.param_groups[0]
    assert group["lr"] == o.lr
    if name == "noisy_kfac":
        assert (group["kl_clip"], group["t_inv"], group["damping_mode"]) == (o.kl_clip, o.t_inv, o.damping_mode)


def test_defaults_have_one_home(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's default is the class's: change the class's and the resolved option follows."""
    init = NoisyAdam.__init__
    defaults = list(init.__defaults__)
    defaults[0] = 0.0123  # lr
    monkeypatch.setattr(init, "__defaults__", tuple(defaults))
    assert train().lr == 0.0123
    assert "noisy_adam 0.0123" in TrainOptions().build_parser().format_help().replace("\n", " ")


def test_saved_options_hold_values_not_none(tmp_path: Path) -> None:
    o = train("--model", "MVG", "--lr", "0.01", "--ckpt_dir", str(tmp_path), "--data_root", str(tmp_path))
    save_options(o, o.run_dir)
    saved = json.loads((Path(o.run_dir) / "opt.json").read_text())
    for key in ("lr", "damping", "momentum", "prior_var", "init_precision", "fisher", "kl_clip", "t_inv",
                "damping_mode", "kl_weight", "data_root"):
        assert saved[key] is not None, key
    assert saved["lr"] == 0.01 and saved["explicit"] == ["ckpt_dir", "data_root", "device", "lr", "model"]
    table = (Path(o.run_dir) / "opt.txt").read_text()
    assert re.search(r"^\s+damping: 0\.001\s*$", table, re.M)  # resolved, not typed: no comment
    assert re.search(r"^\s+lr: 0\.01\s+\[default: 0\.001\]$", table, re.M)  # typed: the default it replaced


def test_data_root_is_recorded_where_the_data_was_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        datafiles) -> None:
    monkeypatch.chdir(tmp_path)
    datafiles.write_fake_mnist(tmp_path / "shared")
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "shared"))
    assert train().data_root == str(tmp_path / "shared")
    monkeypatch.delenv("DATA_ROOT")
    assert train().data_root == str(tmp_path / "data")  # where a download would go, made absolute


def test_kl_clip_zero_turns_it_off_and_help_states_the_default() -> None:
    o = train("--model", "MVG", "--kl_clip", "0")
    opt = make_optimizer(o, make_model(o))
    assert isinstance(opt, NoisyKFAC) and opt.param_groups[0]["kl_clip"] is None
    assert train("--model", "MVG").kl_clip == 1e-4
    text = " ".join(TrainOptions().build_parser().format_help().split())
    assert "K-FAC trust region on the update (default: 0.0001; 0 turns it off)" in text


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    """A run folder whose opt.json, as older versions wrote it, holds None for the optimizer's options."""
    o = train("--model", "MVG", "--name", "old", "--ckpt_dir", str(tmp_path))
    saved = {k: v for k, v in vars(o).items()}
    for key in ("lr", "damping", "momentum", "prior_var", "init_precision", "fisher", "kl_clip", "damping_mode",
                "data_root"):
        saved[key] = None
    run = Path(o.run_dir)
    run.mkdir(parents=True)
    (run / "opt.json").write_text(json.dumps(saved))
    (run / "epoch_1.pt").write_bytes(b"")
    return tmp_path


def test_old_options_with_none_still_resolve_at_test_time(old_run: Path) -> None:
    o = _TestOptions().parse(["--ckpt_dir", str(old_run), "--device", "cpu"])
    assert (o.name, o.model, o.optimizer, o.epoch) == ("old", "MVG", "noisy_kfac", 1)
    assert o.lr == 1e-3 and o.kl_clip == 1e-4 and o.fisher == "example" and o.data_root is None


@pytest.mark.parametrize("flag", ["--damping", "--lr", "--kl_clip", "--display_port", "--subset", "--t_inv"])
def test_training_flags_are_an_error_in_test_py(capsys: pytest.CaptureFixture, old_run: Path, flag: str) -> None:
    value = ["5"]
    with pytest.raises(SystemExit) as info:
        _TestOptions().parse(["--ckpt_dir", str(old_run), flag, *value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert err == f"error: {flag} is a training option; test.py uses the run's value (from its opt.json), " \
                  f"so drop {flag}\n"


def test_cited_math_sections_exist() -> None:
    headings = [line[3:] for line in (REPO / "docs" / "MATH.md").read_text().splitlines() if line.startswith("## ")]
    cited = set()
    for path in REPO.rglob("*.py"):
        if ".venv" in path.parts:
            continue
        cited |= {" ".join(c.split()) for c in re.findall(r'MATH\.md, "([^"]+)"', path.read_text())}
    assert cited, "no citations found: the pattern is wrong"
    missing = [c for c in cited if not any(h.startswith(c) for h in headings)]
    assert missing == [], f"docs/MATH.md has no section {missing}; sections: {headings}"


@pytest.mark.slow
def test_test_py_reuses_the_runs_data_root_and_no_progress_updates_in_a_file(tmp_path: Path,
                                                                             data_root: Path) -> None:
    ckpt = tmp_path / "ckpt"
    env = {k: v for k, v in os.environ.items() if k != "DATA_ROOT"}
    out = tmp_path / "train.out"
    with open(out, "w") as f:
        subprocess.run([sys.executable, str(REPO / "train.py"), "--data_root", str(data_root), "--subset", "500",
                        "--epoch", "1", "--batch_size", "50", "--test_samples", "1", "--ckpt_dir", str(ckpt),
                        "--name", "r", "--no_visdom", "--device", "cpu", "--num_threads", "1"],
                       cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, check=True, timeout=300)
    text = out.read_text()
    assert "\r" not in text and text.count("epoch   1  train loss") == 1  # one line per epoch, no bar
    saved = json.loads((ckpt / "r" / "opt.json").read_text())
    # recorded absolute, so a relative --data_root (as `make test` passes) still works from another folder
    assert Path(saved["data_root"]) == (REPO / data_root).absolute()
    assert saved["lr"] == optimizer_defaults("noisy_adam")["lr"]
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "test.py"), "--ckpt_dir", str(ckpt), "--device", "cpu",
                           "--test_samples", "1", "--num_threads", "1"],
                          cwd=empty, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["name"] == "r"
