"""Data-parallel training on ``torch.distributed``: gloo, CPU, 2 processes on loopback.

* Equivalence: 2 ranks x batch B give the same means and curvature state after k = 3 steps
  as 1 rank x batch 2B, to 1e-5, for Noisy Adam and VOGN (per-example squared gradients, and
  the batch-gradient square), Noisy K-FAC (Kronecker factors; factored damping with t_inv = 2,
  i.e. decompositions on steps 1, 2 (warm-up) and 3; exact damping with t_inv = 1 and the trust region) and
  Adam (``average_gradients``). The net has a convolution and linear layers with and without
  bias; the batches come from ``InMemoryLoader``'s sharding, whose rank batches of one step
  together are the 2B batch.

  The noise is *the same on both ranks*, by seeding them identically, rather than switched
  off: a step's weight noise does not depend on the batch size, so the 1 x 2B reference
  draws exactly the same sample, and the noisy path (the forward at ``mu + eps``, the prior
  term at the sampled weights, the averaged sample in the bucket) is checked as well, which
  zero noise would skip. The reference runs in the pytest process, without a process group.
* Noise on (ranks seeded ``seed + 1000 * rank`` as ``train.py`` does): the ranks draw
  different noise, yet hold bit-identical means and curvature after every step.
* ``broadcast_flag`` (a non-finite loss on one rank stops all), ``sum_over_ranks``, the
  per-rank thread count, and ``average_running_stats`` (BatchNorm statistics: the ranks' mean).
* End to end: ``torchrun --nproc_per_node=2 train.py`` on 2000 MNIST images writes one set of
  checkpoints (with both ranks' RNG states) and ``test.py`` reads them, and scores them as the two ranks did.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import free_port, free_ports, run_ranks
from torch import nn

from data import InMemoryLoader
from models import BayesianConv2d, BayesianLinear, bayesian_layers
from optimizers import VOGN, NoisyAdam, NoisyKFAC
from util import distributed
from util.checkpoint import list_epochs

REPO = Path(__file__).resolve().parent.parent
WORLD, BATCH, STEPS = 2, 32, 3  # per-rank batch B; the reference takes 2B
TOL = 1e-5
#: the exact damping samples ``Q_S (E * R) Q_A^T``: for a given ``E`` the sample turns with
#: the eigenbasis, which a float32 rounding of A (1e-7) moves by 1e-7 / (eigenvalue gap),
#: measured 2e-5..7e-5 here (not a reduction error): that case runs in float64 (< 1e-12)
FLOAT64 = ("noisy_kfac_exact_clip",)

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

_NGVI = dict(lr=3e-2, num_data=500, init_precision=100.0)  # noise std about 0.1: it matters
CASES: dict[str, tuple[type | None, dict]] = {
    "noisy_adam": (NoisyAdam, _NGVI),
    "noisy_adam_batch_fisher": (NoisyAdam, dict(_NGVI, fisher="batch")),
    "vogn": (VOGN, _NGVI),
    "noisy_kfac": (NoisyKFAC, dict(_NGVI, damping=1e-2, t_inv=2)),
    # block-tridiagonal: the net's two Linear layers form a chain (cross factors in the bucket, joint noise)
    "noisy_kfac_tridiagonal": (NoisyKFAC, dict(_NGVI, damping=1e-2, t_stats=1, t_inv=2, structure="block_tridiagonal")),
    "noisy_kfac_exact_clip": (NoisyKFAC, dict(_NGVI, damping=1e-2, t_inv=1, damping_mode="exact", kl_clip=1e-2)),
    # learned prior: eta re-estimated after step 1, so steps 2 and 3 use it (every rank the same eta)
    "noisy_adam_prior_auto": (NoisyAdam, dict(_NGVI, prior_var="auto", prior_every=1)),
    "noisy_kfac_prior_auto": (NoisyKFAC, dict(_NGVI, damping=1e-2, t_inv=2, prior_var="auto", prior_every=1)),
    "adam": (None, dict(lr=1e-2)),
}


def _net(posterior: str) -> nn.Module:
    """conv3x3(1->2, bias) - relu - fc(32->16, no bias) - relu - fc(16->10, bias), on 6x6 images."""
    torch.manual_seed(0)
    if posterior == "MAP":
        conv, lin = nn.Conv2d, nn.Linear
    else:
        conv = lambda *a, **k: BayesianConv2d(*a, posterior=posterior, **k)
        lin = lambda *a, **k: BayesianLinear(*a, posterior=posterior, **k)
    return nn.Sequential(conv(1, 2, 3), nn.ReLU(), nn.Flatten(), lin(32, 16, bias=False), nn.ReLU(), lin(16, 10))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    n = STEPS * WORLD * BATCH
    return torch.randn(n, 1, 6, 6, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _posterior(name: str) -> str:
    cls = CASES[name][0]
    return "MAP" if cls is None else ("MVG" if cls is NoisyKFAC else "FFG")


def run_case(name: str, rank: int, world: int, noise_seed: int) -> dict:
    """``STEPS`` steps of case ``name`` as rank ``rank`` of ``world`` (the batch is 2B / world)."""
    cls, kwargs = CASES[name]
    dtype = torch.float64 if name in FLOAT64 else torch.float32
    model = _net(_posterior(name)).to(dtype)
    opt = torch.optim.Adam(model.parameters(), **kwargs) if cls is None else cls(model, **kwargs)
    x, y = _data()
    x = x.to(dtype)
    loader = InMemoryLoader(x, y, WORLD * BATCH // world, shuffle=True, seed=3, rank=rank, world_size=world)
    loader.set_epoch(1)
    torch.manual_seed(noise_seed)
    out: dict = {"noise": [], "params": [], "state": [], "std": []}
    for xb, yb in loader:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        out["noise"].append([t.clone() for _, m in bayesian_layers(model) for t in m.last_noise if t is not None])
        if cls is None:
            distributed.average_gradients(model)
        opt.step()
        out["params"].append({k: v.clone() for k, v in model.state_dict().items()})
        out["state"].append({f"{i}.{k}": v.clone() for i, s in opt.state_dict()["state"].items()
                             for k, v in s.items() if torch.is_tensor(v)})
        out["std"].append({f"{n}.{i}": s for n, m in bayesian_layers(model)
                           for i, s in enumerate((m.weight_std(), m.bias_std())) if s is not None})
        if cls is not None and opt.state_dict().get("prior") is not None:  # the learned eta, per layer
            out["state"][-1]["prior_vars"] = torch.tensor(opt.state_dict()["prior"]["prior_vars"], dtype=torch.float64)
    assert len(out["params"]) == STEPS
    return out


def bn_case(rank: int) -> dict:
    """BatchNorm running statistics of each rank's own shard, then after ``average_running_stats``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 4),
                          nn.BatchNorm1d(4, affine=False))
    gen = torch.Generator().manual_seed(10 + rank)
    for _ in range(2):
        model(torch.randn(8, 1, 6, 6, generator=gen) * (1 + rank) + rank)  # the shards differ
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    distributed.average_running_stats(model)
    return {"before": before, "after": {k: v.clone() for k, v in model.state_dict().items() if "running" in k}}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx, device = distributed.setup("cpu")
    try:
        assert (ctx.rank, ctx.world_size, device.type) == (rank, WORLD, "cpu")
        result = {"threads": torch.get_num_threads(),
                  "flags": [distributed.broadcast_flag(rank == 1, ctx), distributed.broadcast_flag(False, ctx)],
                  "sums": distributed.sum_over_ranks([rank, 0.5], ctx),
                  "bn": bn_case(rank),
                  "same_noise": {name: run_case(name, rank, WORLD, noise_seed=1) for name in CASES},
                  "rank_noise": {name: run_case(name, rank, WORLD, noise_seed=1 + 1000 * rank)
                                 for name in CASES if CASES[name][0] is not None}}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        distributed.cleanup(ctx)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Run every case on 2 gloo ranks once; their results, by rank."""
    out = tmp_path_factory.mktemp("ddp")
    run_ranks(_worker, free_port(), str(out), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """``max |got - ref| <= TOL * max |ref|``: float32 rounding, relative to the tensor's own scale.

    Relative to the tensor itself (not to ``max(1, ...)``): a Fisher of size 1e-4 that is off by a
    factor 2 is a relative error of 1, not an absolute 1e-4 that a unit-scale tolerance would pass.
    """
    assert got.shape == ref.shape, what
    if not ref.numel():  # e.g. the empty low-rank coefficients of an exact MVG layer
        return
    scale = float(ref.abs().max())
    err = float((got - ref).abs().max()) / scale if scale > 0 else float((got - ref).abs().max())
    assert err <= TOL, f"{what}: max |difference| {err:.2e} relative to max |ref| = {scale:.2e} > {TOL}"


@pytest.mark.slow  # the ranks: two spawned processes
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_rank_with_twice_the_batch(ranks: list[dict], name: str) -> None:
    ref = run_case(name, rank=0, world=1, noise_seed=1)
    for rank, res in enumerate(ranks):
        got = res["same_noise"][name]
        for step in range(STEPS):
            # the same eps; scaled by the posterior of the (1e-7-close) curvature after step 1
            for i, (n, r) in enumerate(zip(got["noise"][step], ref["noise"][step])):
                close(n, r, f"rank {rank} step {step + 1} noise {i}")
            for kind in ("params", "state", "std"):
                assert got[kind][step].keys() == ref[kind][step].keys()
                for key, r in ref[kind][step].items():
                    close(got[kind][step][key], r, f"rank {rank} step {step + 1} {kind} {key}")
    # the steps did something: the means moved and, for the NGVI optimizers, the curvature too
    first, last = ref["params"][0], ref["params"][-1]
    assert any((first[k] - last[k]).abs().max() > 1e-3 for k in first)
    init = dict(_net(_posterior(name)).named_parameters())
    assert all((ref["params"][-1][k] - init[k]).abs().max() > 1e-3 for k in init)
    if CASES[name][0] is not None:
        curv = [k for k in ref["state"][-1] if k.split(".")[-1] in ("fisher", "A", "S")]
        assert curv and all(ref["state"][-1][k].abs().max() > 0 for k in curv)
    if CASES[name][1].get("prior_var") == "auto":  # eta was learned, not left at its initial 1
        assert (ref["state"][-1]["prior_vars"] - 1).abs().min() > 1e-3


@pytest.mark.slow  # the ranks: two spawned processes
@pytest.mark.parametrize("name", [n for n in CASES if CASES[n][0] is not None])
def test_ranks_draw_their_own_noise_and_keep_identical_means(ranks: list[dict], name: str) -> None:
    r0, r1 = (res["rank_noise"][name] for res in ranks)
    for step in range(STEPS):
        assert not any(torch.allclose(a, b) for a, b in zip(r0["noise"][step], r1["noise"][step]))
        for kind in ("params", "state"):
            for key, v in r0[kind][step].items():
                assert torch.equal(v, r1[kind][step][key]), f"step {step + 1}: {kind} {key} differs across ranks"
    # and the K = 2 noise samples change the result compared with one shared sample
    same = ranks[0]["same_noise"][name]["params"][-1]
    assert any(not torch.allclose(v, same[k]) for k, v in r0["params"][-1].items())


@pytest.mark.slow  # the ranks: two spawned processes
def test_batchnorm_running_stats_averaged_over_ranks(ranks: list[dict]) -> None:
    before = [r["bn"]["before"] for r in ranks]
    assert set(before[0]) == {"1.running_mean", "1.running_var", "4.running_mean", "4.running_var"}
    for key in before[0]:
        assert not torch.allclose(before[0][key], before[1][key])  # each rank saw its own shard
        mean = (before[0][key] + before[1][key]) / 2
        for r in ranks:
            torch.testing.assert_close(r["bn"]["after"][key], mean, rtol=1e-6, atol=0)


@pytest.mark.slow  # the ranks: two spawned processes
def test_flag_sums_and_threads(ranks: list[dict]) -> None:
    for res in ranks:
        assert res["flags"] == [True, False]  # a non-finite loss on rank 1 stops rank 0 too
        assert res["sums"] == [1.0, 1.0]  # the epoch's loss and counts, summed over the ranks
        assert res["threads"] == max(1, len(os.sched_getaffinity(0)) // WORLD)


@pytest.mark.slow
def test_torchrun_train_then_test(tmp_path: Path, data_root: Path) -> None:
    ckpt = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "train.py", "--dataset", "MNIST", "--data_root", str(data_root), "--subset", "2000", "--epoch", "1",
           "--device", "cpu", "--no_visdom", "--no_progress", "--test_samples", "2", "--ckpt_dir", str(ckpt),
           "--name", "ddp"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("epoch   1  train loss") == 1  # only rank 0 prints and logs
    run = ckpt / "ddp"
    assert [p.name for p in run.glob("*.pt")] == ["epoch_1.pt"] and list_epochs(run) == [1]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1]
    assert math.isfinite(records[-1]["train_loss"])
    assert json.loads((run / "opt.json").read_text())["n"] == 2000  # --n stays the full data-set size
    state = torch.load(run / "epoch_1.pt", weights_only=False)
    assert state["optimizer"]["param_groups"][0]["num_data"] == 2000
    assert state["iteration"] == 10  # 2000 images / (2 ranks x 100)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])

    proc = subprocess.run([sys.executable, "test.py", "--ckpt_dir", str(ckpt), "--name", "ddp", "--device", "cpu",
                           "--data_root", str(data_root), "--test_samples", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["name"] == "ddp" and result["epoch"] == 1 and 0.0 <= result["test_acc"] <= 1.0
    # the ranks' evaluation (each its half of the test set) is test.py's one-process evaluation: same networks
    for key in ("test_acc", "test_nll", "test_ece"):
        assert records[-1][key] == pytest.approx(result[key], rel=1e-6, abs=1e-7), key


# ============================================================================ --dist_timeout, resume across machines
TIMEOUT_S, SLEEP_S = 2.0, 8.0


def _timeout_worker(rank: int, port: int, out_dir: str) -> None:
    """Rank 0 sleeps (a long download or evaluation) before a collective that rank 1 is already waiting in."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # join together: the timeout also bounds the rendezvous, and the two imports may finish seconds apart
    (Path(out_dir) / f"ready{rank}").touch()
    while not all((Path(out_dir) / f"ready{r}").exists() for r in range(2)):
        time.sleep(0.01)
    ctx, _ = distributed.setup("cpu", timeout=TIMEOUT_S)
    result: dict = {"error": None}
    try:
        if rank == 0:
            time.sleep(SLEEP_S)
        t0 = time.monotonic()
        try:
            distributed.broadcast_flag(False, ctx)
        except Exception as e:  # gloo: a timeout error on the waiting rank, then a closed connection
            result["error"] = f"{type(e).__name__}: {e}"
        result["waited"] = time.monotonic() - t0
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        distributed.cleanup(ctx)


@pytest.mark.slow
def test_dist_timeout_bounds_the_wait_in_a_collective(tmp_path: Path) -> None:
    """The timeout reaches the process group: rank 1 gives up after about 2 s instead of waiting out rank 0's 8 s
    (gloo's own default is 30 minutes, NCCL's 10)."""
    run_ranks(_timeout_worker, free_port(), str(tmp_path), timeout=60)
    waiting = torch.load(tmp_path / "rank1.pt")
    assert waiting["error"] is not None and "imed out" in waiting["error"], waiting
    assert waiting["waited"] < SLEEP_S / 2, waiting


def test_train_py_joins_the_group_with_dist_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import train

    class Joined(Exception):
        pass

    seen = []

    def setup(device: str, timeout: float):
        seen.append(timeout)
        raise Joined

    monkeypatch.setattr(train.distributed, "setup", setup)
    for flags, timeout in (([], distributed.DIST_TIMEOUT_S), (["--dist_timeout", "90"], 90.0)):
        with pytest.raises(Joined):
            train.main(["--ckpt_dir", str(tmp_path), "--no_visdom", *flags])
        assert seen.pop() == timeout


def _node(rank: int, port: int, cwd: Path, *flags: str) -> subprocess.Popen:
    """Rank ``rank`` of 2 as torchrun starts it on a machine of its own (``cwd``: its disk)."""
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *flags], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _start_two_nodes(cwds: tuple[Path, Path], *flags: str, port: int | None = None) -> list[subprocess.Popen]:
    port = port or free_port()
    return [_node(rank, port, cwd, *flags) for rank, cwd in enumerate(cwds)]


def _wait(procs: list[subprocess.Popen]) -> None:
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(o[-2000:] for o in outs)


def _two_nodes(cwds: tuple[Path, Path], *flags: str) -> None:
    _wait(_start_two_nodes(cwds, *flags))


@pytest.mark.slow
def test_resume_on_two_machines_without_a_shared_filesystem(tmp_path: Path, data_root: Path) -> None:
    """Only rank 0's machine holds the checkpoints (relative ``--ckpt_dir`` in each machine's folder): ``--resume``
    resumes every rank from rank 0's, and the run equals one that was not interrupted."""
    flags = ["--dataset", "MNIST", "--data_root", str(data_root), "--subset", "400", "--device", "cpu",
             "--no_visdom", "--no_progress", "--test_samples", "1", "--ckpt_dir", "ckpt", "--name", "r",
             "--model", "MVG", "--num_threads", "1", "--dist_timeout", "120"]
    shared, node0, node1 = (tmp_path / d for d in ("shared", "node0", "node1"))
    for d in (shared, node0, node1):
        d.mkdir()
    # the uninterrupted run and the first epoch of the interrupted one, side by side (start-up is most of their cost)
    ports = free_ports(2)
    _wait(_start_two_nodes((shared, shared), *flags, "--epoch", "2", port=ports[0])
          + _start_two_nodes((node0, node1), *flags, "--epoch", "1", port=ports[1]))
    assert list_epochs(node0 / "ckpt" / "r") == [1] and list_epochs(node1 / "ckpt" / "r") == []
    _two_nodes((node0, node1), *flags, "--epoch", "2", "--resume")

    def epochs(run: Path) -> list[dict]:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "sec_per_epoch"} for r in records if r["kind"] == "epoch"]

    assert epochs(node0 / "ckpt" / "r") == epochs(shared / "ckpt" / "r")
    assert len(epochs(shared / "ckpt" / "r")) == 2
    ref = torch.load(shared / "ckpt" / "r" / "epoch_2.pt", weights_only=False)
    got = torch.load(node0 / "ckpt" / "r" / "epoch_2.pt", weights_only=False)
    for key, value in ref["model"].items():
        assert torch.equal(got["model"][key], value), key
