"""Smoke test of the benchmarks: ``bench/step_time.py`` and ``bench/per_example.py`` run with
``--quick`` (in parallel subprocesses, 1 thread each) and write JSON with the documented keys.

The quick numbers are not meaningful timings (one round; NoisyKFAC with ``t_inv = 2``), but the
per-example statistics must still agree with the naive loop, and every ``pass`` verdict must be the
one its own figures give (a flipped comparison is caught). The committed results in
``bench/results/`` are held to the same: their verdicts follow from their figures, and the one the
README claims (ours faster than BackPACK and ``torch.func`` on both architectures) is true there.

The peers (BackPACK, IVON) are skipped with the reason shown when missing locally, and are a failure
under CI.
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
ARCHS = ("mlp", "lenet5")
STEP_METHODS = ("NoisyAdam", "NoisyAdamBatch", "NoisyAdamHessian", "VOGN", "NoisyKFAC", "IVON", "NoisyKFACr64")
PER_EXAMPLE_METHODS = ("plain", "ours", "backpack", "torch.func", "naive loop")

RESULTS = REPO / "bench" / "results"


@pytest.fixture(scope="module", autouse=True)
def _peers() -> None:
    require_module("backpack")
    require_module("ivon")


def _positive(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_bench_scripts_quick(tmp_path: Path) -> None:
    outs = {name: tmp_path / f"{name}.json" for name in ("step_time", "per_example")}
    procs = {name: subprocess.Popen([sys.executable, str(REPO / "bench" / f"{name}.py"), "--quick", "--out", str(out)]
                                    + (["--threads", "1"] if name == "step_time" else []),
                                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, out in outs.items()}
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name}.py failed:\n{log[-3000:]}"

    step = json.loads(outs["step_time"].read_text())
    for arch in ARCHS:
        assert set(step[arch]) == set(STEP_METHODS)
        assert all(_positive(step[arch][m]) for m in STEP_METHODS)
        assert set(step["raw_ms"][arch]) == {"Adam", *STEP_METHODS}
        assert set(step["flop_ratio"][arch]) == set(STEP_METHODS)
        assert all(_positive(v) for v in step["flop_ratio"][arch].values())
        assert set(step["pass"][arch]) == {"NoisyAdam", "NoisyAdamBatch", "NoisyAdamHessian", "VOGN", "NoisyKFAC",
                                           "NoisyKFACr64"}
    assert_step_verdicts(step)
    assert {"threads", "torch", "repeats"} <= set(step["config"])
    assert set(step["by_threads"]) == {"1"}

    per = json.loads(outs["per_example"].read_text())
    for arch in ARCHS:
        for m in PER_EXAMPLE_METHODS:
            entry = per[arch][m]
            assert all(_positive(entry[k]) for k in ("ms", "time_ratio", "peak_mb", "memory_ratio"))
            if m != "plain":
                assert entry["agrees"], f"{arch}/{m}: relative deviation {entry['max_rel_diff']} from the naive loop"
    assert_per_example_verdicts(per)
    assert {"torch", "repeats", "memory"} <= set(per["config"])


@pytest.mark.slow
def test_step_time_resnet20_quick(tmp_path: Path) -> None:
    """ResNet-20 (BatchNorm, residual blocks) runs under every timed method; the verdicts use its targets."""
    out = tmp_path / "step_time_resnet20.json"
    cmd = [sys.executable, str(REPO / "bench" / "step_time.py"), "--quick", "--archs", "resnet20", "--threads", "1",
           "--methods", "NoisyAdam,NoisyAdamBatch,VOGN,NoisyKFAC", "--kfac_rank", "", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    step = json.loads(out.read_text())
    methods = {"NoisyAdam", "NoisyAdamBatch", "VOGN", "NoisyKFAC"}
    assert set(step["resnet20"]) == methods and "mlp" not in step
    assert all(_positive(step["resnet20"][m]) and _positive(step["flop_ratio"]["resnet20"][m]) for m in methods)
    assert set(step["pass"]["resnet20"]) == methods
    assert step["targets"]["NoisyKFAC"]["resnet20"] == 2.0 and step["targets"]["NoisyAdamBatch"]["resnet20"] == 1.15
    assert_step_verdicts(step)


def assert_step_verdicts(step: dict) -> None:
    """``pass[arch][method]`` is ``time ratio <= target``, computed from the same file's figures."""
    for arch, verdicts in step["pass"].items():
        for method, verdict in verdicts.items():
            expected = step[arch][method] <= step["targets"][method][arch]
            assert verdict is expected, f"{arch}/{method}: pass={verdict} but ratio {step[arch][method]:.3f} " \
                                        f"vs target {step['targets'][method][arch]}"


def assert_per_example_verdicts(per: dict) -> None:
    """``pass[arch]`` is "ours faster than BackPACK and torch.func", from the same file's figures."""
    for arch in ARCHS:
        ours, peers = per[arch]["ours"]["ms"], min(per[arch]["backpack"]["ms"], per[arch]["torch.func"]["ms"])
        assert per["pass"][arch] is (ours < peers), f"{arch}: pass={per['pass'][arch]}, ours {ours} ms, peers {peers}"


def test_committed_results_verdicts() -> None:
    """The committed benchmark results: verdicts follow from their figures; the README's claim holds there."""
    step = json.loads((RESULTS / "step_time.json").read_text())
    per = json.loads((RESULTS / "per_example.json").read_text())
    assert_step_verdicts(step)
    if (RESULTS / "step_time_resnet20.json").exists():
        assert_step_verdicts(json.loads((RESULTS / "step_time_resnet20.json").read_text()))
    assert_per_example_verdicts(per)
    for arch in ARCHS:
        assert per["pass"][arch] is True, f"README claims ours is fastest on {arch}; bench/results says otherwise"
        for m in PER_EXAMPLE_METHODS:
            if m != "plain":
                assert per[arch][m]["agrees"] is True, f"{arch}/{m}"
