"""``bench/accuracy.py`` on the ResNet-20 task, tiny: the task's batch size, scoring after the last epoch
only, ``--test_subset`` and ``--norm_posterior`` reach the runs, the key and the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_module

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_resnet20_task_tiny(data_root: Path, tmp_path: Path) -> None:
    require_module("ivon")
    md = tmp_path / "results.md"
    cmd = [sys.executable, str(REPO / "bench" / "accuracy.py"), "--data_root", str(data_root),
           "--tasks", "fmnist_resnet20", "--methods", "Adam,NoisyAdam", "--conv_epochs", "2", "--seeds", "1",
           "--no_sweep", "--subset", "256", "--test_subset", "64", "--norm_posterior", "gaussian",
           "--out", str(tmp_path), "--md", str(md)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    store = json.loads((tmp_path / "accuracy.json").read_text())
    runs = {r["method"]: (k, r) for k, r in store["runs"].items()}
    assert set(runs) == {"Adam", "NoisyAdam"}
    for key, run in runs.values():
        assert key.endswith("|subset=256|test_subset=64"), key
        assert run["curves"]["test_acc"][0] is None and run["curves"]["test_nll"][0] is None  # epoch 1 not scored
        assert 0 <= run["curves"]["test_acc"][1] <= 1 and run["final"]["acc"] == run["curves"]["test_acc"][1]
        assert 0 <= run["final"]["ood_auroc"] <= 1
        assert run["optimizer_settings"].get("batch_size", 128) == 128
    assert runs["NoisyAdam"][1]["optimizer_settings"]["norm_posterior"] == "gaussian"
    assert "norm_posterior" not in runs["Adam"][1]["optimizer_settings"]
    noisy = runs["NoisyAdam"][1]["final"]  # the diagnostic of the Bayesian methods: means alone, noise-to-signal
    assert 0 <= noisy["acc_mean_weights"] <= 1 and noisy["nll_mean_weights"] > 0 and noisy["std_over_abs_mean"] > 0
    assert "acc_mean_weights" not in runs["Adam"][1]["final"]
    assert store["plans"]["fmnist_resnet20"]["test_subset"] == 64
    text = md.read_text()
    assert "batch 128" in text and "first 64 test (and OOD) images" in text
    assert "the posterior means alone" in text
