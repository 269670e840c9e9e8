"""``train.py`` and ``test.py`` end to end on real MNIST, each result against an independent recomputation.

* Epoch order: a MAP net trained by SGD at lr 1e-9 (so its weights stay put to ~1e-8) logs every step's
  loss; the losses equal those of the saved net on the batches of an independently drawn permutation
  (``randperm(subset, seed + epoch)`` of the seeded subset, the documented order of ``data.loader``),
  and the two epochs' orders differ.
* ``test.py``: accuracy, NLL, ECE and OOD AUROC (FashionMNIST) against a predictive computed here from
  the checkpoint's means and posterior stds (own sampling, own metrics, rank-based AUROC written here);
  with ``--test_samples 0`` exactly the mean weights' figures, with ``--test_samples 50`` the MC
  predictive's, which differ from the mean weights' by much more than the tolerance; OOD inputs must
  be less confident than in-distribution ones (AUROC > 0.5, and not 1 - AUROC).
* Resume through ``train.py`` for VOGN (2 MC samples per step, step LR schedule) and Noisy K-FAC
  (factored damping with ``--fisher true``, ``t_stats 2``, ``t_inv 3``, cosine schedule; exact damping
  with ``t_stats 3``, ``t_inv 2``): continuing from epoch 1's checkpoint ends bit-identical to the
  uninterrupted run, and the learning rate recorded in ``metrics.jsonl`` follows the schedule's formula.
* ``--train_samples 2`` changes the VOGN run (the multi-sample math itself is checked in test_optimizers).
* ``--fisher true`` reaches Noisy K-FAC: against the same run with the empirical Fisher, the input
  factor ``A`` of the first layer (which only sees the images) is identical, the output factors differ.
* Learning: 300 steps of 50 images (15000 MNIST images) bring every optimizer (Noisy Adam, VOGN,
  Noisy K-FAC, Adam) well above chance (0.1): test accuracy > 0.87, measured 0.89 for Noisy K-FAC
  and 0.92-0.93 for the others; a broken update does not get there.

Hyper-parameters are passed explicitly (no dependence on the defaults). The runs start in a pool of
concurrent subprocesses (1 thread each) from one module fixture.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_checkpoint

from data import load_split

REPO = Path(__file__).resolve().parent.parent
WALL_CLOCK = ("sec_per_epoch",)
COMMON = ["--no_visdom", "--no_progress", "--num_threads", "1"]
HIDDEN = 64

pytestmark = pytest.mark.slow

# -- the runs --------------------------------------------------------------------------------------
ORDER = dict(seed=3, subset=200, batch=20, epochs=2)
ORDER_ARGS = ["--model", "MAP", "--optimizer", "sgd", "--lr", "1e-9", "--momentum", "0.0", "--hidden", "16",
              "--subset", str(ORDER["subset"]), "--batch_size", str(ORDER["batch"]), "--epoch", str(ORDER["epochs"]),
              "--seed", str(ORDER["seed"]), "--log_interval", "1", "--test_samples", "0"]
TINY = ["--subset", "200", "--batch_size", "40", "--hidden", "16", "--test_samples", "2", "--log_interval", "2",
        "--epoch", "3", "--seed", "1"]  # 5 steps per epoch
KFAC = ["--model", "MVG", "--optimizer", "noisy_kfac", "--lr", "1e-2", "--momentum", "0.9", "--damping", "1e-2",
        "--kl_clip", "1e-2", "--prior_var", "1", "--init_precision", "1e3"]
RESUME = {  # name -> (args, lr schedule formula: lr(epoch) / lr0)
    "vogn": (["--model", "FFG", "--optimizer", "vogn", "--lr", "1e-2", "--momentum", "0.9", "--damping", "1e-3",
              "--prior_var", "1", "--init_precision", "1e3", "--train_samples", "2",
              "--lr_schedule", "step", "--lr_step", "1", "--lr_decay", "0.3"],
             lambda e: 0.3 ** (e - 1)),
    "kfac_factored_true": (KFAC + ["--damping_mode", "factored", "--fisher", "true", "--t_stats", "2", "--t_inv", "3",
                                   "--lr_schedule", "cosine"],
                           lambda e: (1 + math.cos(math.pi * (e - 1) / 3)) / 2),
    "kfac_exact": (KFAC + ["--damping_mode", "exact", "--fisher", "example", "--t_stats", "3", "--t_inv", "2",
                           "--lr_schedule", "step", "--lr_step", "2", "--lr_decay", "0.5"],
                   lambda e: 0.5 ** ((e - 1) // 2)),
}
LEARN_STEPS = 300
LEARN_DATA = ["--subset", "15000", "--batch_size", "50", "--epoch", "1", "--hidden", str(HIDDEN), "--seed", "0",
              "--test_samples", "5", "--log_interval", "50"]
LEARN = {
    "noisy_adam": ["--model", "FFG", "--optimizer", "noisy_adam", "--lr", "1e-2", "--momentum", "0.9",
                   "--damping", "1e-3", "--prior_var", "1", "--init_precision", "1e3"],
    "vogn": ["--model", "FFG", "--optimizer", "vogn", "--lr", "1e-2", "--momentum", "0.9", "--damping", "1e-3",
             "--prior_var", "1", "--init_precision", "1e3"],
    "noisy_kfac": ["--model", "MVG", "--optimizer", "noisy_kfac", "--lr", "3e-2", "--momentum", "0.9",
                   "--damping", "1e-2", "--kl_clip", "1e-2", "--prior_var", "1", "--init_precision", "1e3",
                   "--t_stats", "1", "--t_inv", "10"],
    "adam": ["--model", "MAP", "--optimizer", "adam", "--lr", "3e-3"],
}
MC_SAMPLES = 50
#: the run test.py evaluates: its MC predictive differs clearly from its mean weights' (NLL by ~0.09)
POSTERIOR = ["--subset", "10000", "--batch_size", "50", "--epoch", "1", "--hidden", str(HIDDEN), "--seed", "0",
             "--test_samples", "0", "--log_interval", "50", "--model", "FFG", "--optimizer", "noisy_adam",
             "--lr", "1e-3", "--momentum", "0.9", "--damping", "1e-3", "--prior_var", "1", "--init_precision", "1e3"]
#: test accuracy every optimizer must beat after LEARN_STEPS steps (chance: 0.1)
LEARN_THRESHOLD = 0.87


def _run(cmd: list[str], log: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log.write_text(f"$ {' '.join(cmd)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


class Runs:
    """The module's train.py/test.py runs; ``ok(name)`` asserts one succeeded and returns its output."""

    def __init__(self, root: Path, data_root: Path) -> None:
        self.root, self.data_root = root, data_root
        self.ckpt = root / "ckpt"
        self.procs: dict[str, subprocess.CompletedProcess] = {}

    def train(self, name: str, args: list[str], ckpt: Path | None = None, key: str | None = None
              ) -> tuple[str, list[str]]:
        return key or name, ["train.py", "--data_root", str(self.data_root), "--ckpt_dir", str(ckpt or self.ckpt),
                      "--name", name, *COMMON, *args]

    def test(self, key: str, name: str, args: list[str]) -> tuple[str, list[str]]:
        return key, ["test.py", "--data_root", str(self.data_root), "--ckpt_dir", str(self.ckpt), "--name", name,
                     "--num_threads", "1", *args]

    def start(self, jobs: list[tuple[str, list[str]]]) -> None:
        workers = max(2, min(4, os.cpu_count() or 2))
        with ThreadPoolExecutor(workers) as pool:
            futures = {key: pool.submit(_run, cmd, self.root / f"{key}.log") for key, cmd in jobs}
        for key, fut in futures.items():
            self.procs[key] = fut.result()

    def ok(self, key: str) -> str:
        proc = self.procs[key]
        assert proc.returncode == 0, f"{key}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    def run_dir(self, name: str, resumed: bool = False) -> Path:
        return (self.root / "resumed" if resumed else self.ckpt) / name


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Runs:
    return Runs(tmp_path_factory.mktemp("e2e"), data_root)


@pytest.fixture(scope="module")
def order_run(runner: Runs) -> Runs:
    runner.start([runner.train("order", ORDER_ARGS)])
    return runner


@pytest.fixture(scope="module")
def resume_runs(runner: Runs) -> Runs:
    """Each RESUME run for 3 epochs, and again from a copy of its epoch-1 checkpoint with ``--resume``;
    the ``--fisher true`` run also with the empirical Fisher, the 2-sample VOGN run also with 1 sample."""
    r = runner
    fisher_emp = [a if a != "true" else "example" for a in RESUME["kfac_factored_true"][0]]
    one_sample = [a if a != "2" or b != "--train_samples" else "1"
                  for b, a in zip([""] + RESUME["vogn"][0], RESUME["vogn"][0])]
    r.start([r.train(f"resume_{n}", TINY + args) for n, (args, _) in RESUME.items()]
            + [r.train("kfac_factored_empirical", TINY + fisher_emp), r.train("vogn_one_sample", TINY + one_sample)])
    jobs = []
    for n, (args, _) in RESUME.items():
        src, dst = r.run_dir(f"resume_{n}"), r.run_dir(f"resume_{n}", resumed=True)
        if r.procs[f"resume_{n}"].returncode != 0:
            continue
        shutil.copytree(src, dst)
        (dst / "epoch_2.pt").unlink()
        (dst / "epoch_3.pt").unlink()
        jobs.append(r.train(f"resume_{n}", TINY + args + ["--resume"], ckpt=dst.parent, key=f"resumed_{n}"))
    r.start(jobs)
    return r


@pytest.fixture(scope="module")
def learn_runs(runner: Runs) -> Runs:
    runner.start([runner.train(f"learn_{n}", LEARN_DATA + args) for n, args in LEARN.items()])
    return runner


@pytest.fixture(scope="module")
def testpy_runs(runner: Runs) -> Runs:
    """test.py on a Noisy Adam run with a broad posterior (200 small steps, N = 10000), with the mean
    weights and with the MC predictive, plus OOD."""
    r = runner
    r.start([r.train("posterior", POSTERIOR)])
    r.ok("posterior")
    r.start([r.test(f"test_{samples}", "posterior",
                    ["--test_samples", str(samples), "--ood_dataset", "FashionMNIST", "--seed", "5"])
             for samples in (0, MC_SAMPLES)]
            + [r.test("test_rotated", "posterior", ["--test_samples", "0", "--rotate", "90"])])
    return r


def records(run_dir: Path, kind: str) -> list[dict]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in recs if x["kind"] == kind]


def checkpoint(run_dir: Path, epoch: int) -> dict:
    return torch.load(run_dir / f"epoch_{epoch}.pt", map_location="cpu", weights_only=False)



# -- epoch order -----------------------------------------------------------------------------------
def mlp_forward(state: dict, x: torch.Tensor, noise: torch.Generator | None = None) -> torch.Tensor:
    """The MLP ``flatten - fc1 - relu - ... - fcL`` at the checkpoint's means (or one posterior sample,
    ``w = mu + sigma * eps``, when ``noise`` is given), written here from the state dict."""
    names = sorted({k.split(".")[0] for k in state if k.startswith("fc")}, key=lambda n: int(n[2:]))
    h = x.flatten(1)
    for i, name in enumerate(names):
        w, b = state[f"{name}.weight"], state[f"{name}.bias"]
        if noise is not None:
            w = w + state[f"{name}.weight_sigma"] * torch.randn(w.shape, generator=noise)
            b = b + state[f"{name}.bias_sigma"] * torch.randn(b.shape, generator=noise)
        h = h @ w.T + b
        if i < len(names) - 1:
            h = h.relu()
    return h


def test_each_epoch_has_its_own_order(order_run: Runs) -> None:
    runs = order_run
    runs.ok("order")
    run = runs.run_dir("order")
    x_all, y_all = load_split("MNIST", True, runs.data_root)
    subset = torch.randperm(x_all.shape[0], generator=torch.Generator().manual_seed(ORDER["seed"]))[:ORDER["subset"]]
    x, y = x_all[subset], y_all[subset]
    state = checkpoint(run, ORDER["epochs"])["model"]
    iters = records(run, "iter")
    steps = ORDER["subset"] // ORDER["batch"]
    assert len(iters) == ORDER["epochs"] * steps
    logged = {e: [r["loss"] for r in iters if r["epoch"] == e] for e in range(1, ORDER["epochs"] + 1)}
    for epoch, losses in logged.items():
        perm = torch.randperm(ORDER["subset"], generator=torch.Generator().manual_seed(ORDER["seed"] + epoch))
        expected = [F.cross_entropy(mlp_forward(state, x[idx]), y[idx]).item()
                    for idx in perm.split(ORDER["batch"])]
        assert losses == pytest.approx(expected, rel=1e-5), f"epoch {epoch}: batches not those of its permutation"
    assert logged[1] != pytest.approx(logged[2], rel=1e-3), "the second epoch repeats the first one's order"


# -- test.py against a recomputation ---------------------------------------------------------------
def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-300).log()).sum(1)


def rank_auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(a positive scores above a negative), ties 1/2, by binary search in the sorted negatives."""
    neg_sorted = neg.double().sort().values
    below = torch.searchsorted(neg_sorted, pos.double(), right=False).double()
    upto = torch.searchsorted(neg_sorted, pos.double(), right=True).double()
    return float((below + 0.5 * (upto - below)).sum()) / (pos.numel() * neg.numel())


def reference_metrics(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict[str, float]:
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        sel = (conf > lo) & (conf <= hi) if b > 0 else conf <= hi
        if sel.any():
            ece += abs(float(correct[sel].sum()) - float(conf[sel].sum())) / len(labels)
    nll = float(-probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean())
    return {"test_acc": float(correct.mean()), "test_nll": nll, "test_ece": ece}


def predictive(state: dict, x: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
    if samples == 0:
        return F.softmax(mlp_forward(state, x).double(), 1)
    gen = torch.Generator().manual_seed(seed)
    return sum(F.softmax(mlp_forward(state, x, gen).double(), 1) for _ in range(samples)) / samples


@pytest.fixture(scope="module")
def recomputed(testpy_runs: Runs) -> dict:
    """From the saved checkpoint: the mean weights' and the MC predictive's figures, computed here."""
    state = checkpoint(testpy_runs.run_dir("posterior"), 1)["model"]
    x, y = load_split("MNIST", False, testpy_runs.data_root)
    x_ood, _ = load_split("FashionMNIST", False, testpy_runs.data_root)
    # the OOD images as the MNIST model sees them: pixels back to [0, 1], then MNIST's statistics
    x_ood = (x_ood * 0.3530 + 0.2860 - 0.1307) / 0.3081
    out = {}
    for samples in (0, MC_SAMPLES):
        p_in, p_out = predictive(state, x, samples, 11), predictive(state, x_ood, samples, 12)
        out[samples] = {**reference_metrics(p_in, y), "ood_auroc": rank_auroc(entropy(p_out), entropy(p_in))}
    return out


def reported(runs: Runs, samples: int) -> dict:
    return json.loads(runs.ok(f"test_{samples}").strip().splitlines()[-1])


def test_test_py_mean_weights_match_recomputation(testpy_runs: Runs, recomputed: dict) -> None:
    runs = testpy_runs
    got, ref = reported(runs, 0), recomputed[0]
    assert got["test_samples"] == 0 and got["ood_dataset"] == "FashionMNIST"
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


#: Monte-Carlo tolerance of two independent 50-sample predictives over 10000 images (measured
#: differences: about a third of these)
MC_TOL = {"test_acc": 0.005, "test_nll": 0.006, "test_ece": 0.01, "ood_auroc": 0.005}


def test_test_py_mc_predictive_matches_recomputation(testpy_runs: Runs, recomputed: dict) -> None:
    got, ref, mean_w = reported(testpy_runs, MC_SAMPLES), recomputed[MC_SAMPLES], recomputed[0]
    assert got["test_samples"] == MC_SAMPLES
    for key, tol in MC_TOL.items():
        assert abs(got[key] - ref[key]) <= tol, f"{key}: test.py {got[key]:.4f}, recomputed {ref[key]:.4f}"
    # the MC predictive is told apart from the mean weights' (a test.py ignoring --test_samples fails)
    assert any(abs(ref[k] - mean_w[k]) > 2 * tol for k, tol in MC_TOL.items()), (ref, mean_w)


def test_test_py_rotate_scores_the_rotated_test_set(testpy_runs: Runs) -> None:
    state = checkpoint(testpy_runs.run_dir("posterior"), 1)["model"]
    x, y = load_split("MNIST", False, testpy_runs.data_root)
    # a quarter turn counter-clockwise moves pixels exactly, so it is rot90 of the normalised images
    ref = reference_metrics(F.softmax(mlp_forward(state, torch.rot90(x, 1, (2, 3))).double(), 1), y)
    got = json.loads(testpy_runs.ok("test_rotated").strip().splitlines()[-1])
    assert got["rotate"] == 90
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
    assert got["test_acc"] < reported(testpy_runs, 0)["test_acc"] - 0.3, "a quarter turn should hurt accuracy"


def test_ood_inputs_are_less_confident(testpy_runs: Runs, recomputed: dict) -> None:
    runs = testpy_runs
    for samples in (0, MC_SAMPLES):
        assert reported(runs, samples)["ood_auroc"] > 0.7, "FashionMNIST is not flagged as out-of-distribution"
        assert recomputed[samples]["ood_auroc"] > 0.7


# -- resume, schedules, --fisher true ---------------------------------------------------------------
@pytest.mark.parametrize("name", list(RESUME))
def test_resume_is_bit_exact(resume_runs: Runs, name: str) -> None:
    runs = resume_runs
    runs.ok(f"resume_{name}")
    runs.ok(f"resumed_{name}")
    a, b = runs.run_dir(f"resume_{name}"), runs.run_dir(f"resume_{name}", resumed=True)
    ca, cb = checkpoint(a, 3), checkpoint(b, 3)
    assert_same_checkpoint(ca, cb, ("epoch", "iteration", "scheduler", "model", "optimizer", "rng"))
    strip = lambda d: json.dumps({k: v for k, v in json.loads(d).items() if k not in WALL_CLOCK})
    lines_a, lines_b = ((r / "metrics.jsonl").read_text().splitlines() for r in (a, b))
    assert [strip(x) for x in lines_a] == [strip(x) for x in lines_b]
    assert torch.isfinite(ca["model"]["fc1.weight"]).all()


@pytest.mark.parametrize("name", list(RESUME))
def test_lr_schedule_follows_its_formula(resume_runs: Runs, name: str) -> None:
    runs = resume_runs
    args, factor = RESUME[name]
    lr0 = float(args[args.index("--lr") + 1])
    for run in (runs.run_dir(f"resume_{name}"), runs.run_dir(f"resume_{name}", resumed=True)):
        epochs = records(run, "epoch")
        assert [r["epoch"] for r in epochs] == [1, 2, 3]
        for r in epochs:
            assert r["lr"] == pytest.approx(lr0 * factor(r["epoch"]), rel=1e-12), (name, r["epoch"])
        for r in records(run, "iter"):
            assert r["lr"] == pytest.approx(lr0 * factor(r["epoch"]), rel=1e-12), (name, r["epoch"])


def test_true_fisher_reaches_noisy_kfac(resume_runs: Runs) -> None:
    runs = resume_runs
    runs.ok("kfac_factored_empirical")
    true_state = checkpoint(runs.run_dir("resume_kfac_factored_true"), 1)["optimizer"]["state"]
    emp_state = checkpoint(runs.run_dir("kfac_factored_empirical"), 1)["optimizer"]["state"]
    with_factors = sorted(k for k, s in true_state.items() if "A" in s)
    assert with_factors == sorted(k for k, s in emp_state.items() if "A" in s) and len(with_factors) == 2
    first, last = with_factors[0], with_factors[-1]
    assert torch.equal(true_state[first]["A"], emp_state[first]["A"])  # same batches, same images
    for k in with_factors:
        s_true, s_emp = true_state[k]["S"], emp_state[k]["S"]
        assert (s_true - s_emp).abs().max() > 1e-2 * s_emp.abs().max(), f"layer {k}: S is the empirical one"
    assert last != first


def test_train_samples_reach_the_training_loop(resume_runs: Runs) -> None:
    """``--train_samples 2`` is not ``--train_samples 1``: the option reaches the loop (its math is
    checked against the reference in tests/test_optimizers.py)."""
    resume_runs.ok("vogn_one_sample")
    two = checkpoint(resume_runs.run_dir("resume_vogn"), 1)["model"]
    one = checkpoint(resume_runs.run_dir("vogn_one_sample"), 1)["model"]
    assert json.loads((resume_runs.run_dir("vogn_one_sample") / "opt.json").read_text())["train_samples"] == 1
    assert not torch.equal(two["fc1.weight"], one["fc1.weight"])


# -- learning ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LEARN))
def test_a_few_hundred_steps_learn_mnist(learn_runs: Runs, name: str) -> None:
    runs = learn_runs
    runs.ok(f"learn_{name}")
    (epoch,) = records(runs.run_dir(f"learn_{name}"), "epoch")
    assert epoch["iteration"] == LEARN_STEPS
    acc = epoch["test_acc"]
    assert acc > LEARN_THRESHOLD, f"{name}: test accuracy {acc:.4f} after {LEARN_STEPS} steps"
