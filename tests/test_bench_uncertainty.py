"""Smoke test of ``bench/uncertainty.py``: a one-epoch run on a small subset writes every documented score for
our method and the peers, and the report and plots follow from the JSON.

The numbers are not meaningful (300 training images); what is checked is that each score exists and is a
probability or a finite loss, that the mean-weight scores exist exactly where there is a posterior, that the
posterior's std percentiles are ordered, and that Laplace reports the prior precision it chose.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_module

REPO = Path(__file__).resolve().parent.parent
ANGLES = (0, 15, 30, 45, 60, 75, 90, 120, 150, 180)


@pytest.mark.slow
def test_uncertainty_bench_quick(tmp_path: Path, data_root: Path) -> None:
    require_module("ivon")
    require_module("laplace")
    out, md = tmp_path / "u.json", tmp_path / "u.md"
    cmd = [sys.executable, "bench/uncertainty.py", "--data_root", str(data_root), "--subset", "300", "--epochs", "1",
           "--test_samples", "2", "--test_subset", "1000",
           "--methods", "Adam", "Laplace", "IVON", "NoisyAdam", "--variant", "NA-b999=NoisyAdam:--beta2 0.999",
           "--out", str(out), "--md", str(md)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = {r["name"]: r for r in json.loads(out.read_text())["runs"].values()}
    assert set(runs) == {"Adam", "Laplace", "IVON", "NoisyAdam", "NA-b999"}
    assert runs["NA-b999"]["flags"] == ["--beta2", "0.999"] and runs["NA-b999"]["options"]["beta2"] == 0.999
    for name, run in runs.items():
        s = run["scores"]
        for angle in ANGLES:
            assert 0 <= s[f"acc@{angle}"] <= 1 and 0 <= s[f"ece@{angle}"] <= 1 and math.isfinite(s[f"nll@{angle}"])
        assert 0 <= s["ood_auroc"] <= 1
        assert ("ood_auroc_mean" in s) == (name != "Adam"), name  # Laplace's mean is its MAP network
        if name in ("IVON", "NoisyAdam", "NA-b999"):
            q = [s[f"std_p{p}"] for p in (0, 10, 50, 90, 100)]
            assert q == sorted(q) and q[0] > 0, (name, q)
    assert runs["Laplace"]["laplace_prior_precision"] > 0
    assert (tmp_path / "uncertainty_mnist_mlp.png").exists()  # beside its JSON, not over the committed plots
    report = md.read_text()
    assert "| method" in report or "method " in report
    assert "NA-b999" in report and "--beta2 0.999" in report
