"""Uncertainty benchmark: clean, shifted and out-of-distribution, for our methods and their peers.

The protocol of Ovadia et al. (2019), "Can you trust your model's uncertainty?", on the tasks this tool
trains on a CPU (docs/uncertainty.md describes it):

* clean test set: accuracy, NLL (log loss) and ECE (15 bins) of the predictive;
* dataset shift: the test set rotated by ``ANGLES`` degrees (the raw images, before normalisation), with
  accuracy, NLL and ECE against the angle;
* out of distribution: AUROC of the predictive entropy, the OOD test split normalised with the training
  set's statistics (as a deployed model sees any input);
* the gain from sampling: the same scores at the mean weights (``*_mean`` keys);
* the posterior: percentiles of the first layer's posterior std (Bayesian methods and IVON).

Methods: ours (``NoisyAdam``, ``VOGN``, ``NoisyKFAC``: ``runner.Run``, what ``train.py`` would do with those
flags) and the peers from their packages: ``Adam``;
``Laplace`` (laplace-torch on that Adam network: last-layer K-FAC Laplace, prior precision by marginal
likelihood, probit predictive); ``IVON`` (``ivon.IVON(lr=0.1, ess=N)``, package defaults otherwise, on the
deterministic network); ``Ensemble`` (5 Adam networks, seeds ``s, s+100, ...``, their softmax averaged).

A variant of one of our methods is ``NAME=METHOD:FLAGS``, e.g.
``--variant "NoisyAdam-b999=NoisyAdam:--beta2 0.999 --init_precision 1e3"``. Each run's flags are recorded.

Usage::

    python bench/uncertainty.py --data_root ../shared/data --tasks mnist_mlp --seeds 3
    python bench/uncertainty.py --data_root ../shared/data --tasks fmnist_resnet20 --seeds 1
    python bench/uncertainty.py --report_only

Results accumulate in ``bench/results/uncertainty.json`` (a run already there is not run again); the report
goes to ``docs/results_uncertainty.md``, the plots ``uncertainty_<task>.png`` (shift) and
``uncertainty_<task>_tradeoff.png`` beside the JSON.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import REPO, RESULTS, environment, table  # noqa: E402
from runner import METHODS, TASKS, Run, Store, Study, command, mean_sd, options  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from data import load_split, take_subset  # noqa: E402
from evaluation import predict  # noqa: E402
from models import bayesian_layers  # noqa: E402
from util.metrics import accuracy, auroc, ece, nll, predictive_entropy  # noqa: E402

ANGLES = (0, 15, 30, 45, 60, 75, 90, 120, 150, 180)
TEST_SAMPLES = 32  # weight samples of the MC predictive (--test_samples)
ENSEMBLE_SIZE = 5
IVON_LR = 0.1
#: the tasks (each with an OOD set) and their epochs
EPOCHS = {"mnist_mlp": 10, "mnist_covnet": 5, "fmnist_covnet": 5, "fmnist_resnet20": 3}
#: our methods
OURS = ("NoisyAdam", "VOGN", "NoisyKFAC")
PEERS = ("Adam", "Laplace", "IVON", "Ensemble")
DEFAULT_METHODS = ("Adam", "Laplace", "IVON", "Ensemble", "NoisyAdam", "NoisyKFAC")


# -- data --------------------------------------------------------------------------------------
class Data:
    """A task's splits on the device: train, test, each rotated test set, and the OOD set."""

    def __init__(self, task: str, data_root: str | None, device: torch.device, subset: int | None,
                 test_subset: int | None = None) -> None:
        dataset, ood = TASKS[task].dataset, TASKS[task].ood
        self.train = take_subset(*load_split(dataset, True, data_root, device), subset, 0)
        n = test_subset  # the first n images of every scored set (a quick check), else all
        self.shifted = {a: tuple(t[:n] for t in load_split(dataset, False, data_root, device, rotate_degrees=a))
                        for a in ANGLES}
        self.test = self.shifted[0]
        self.ood = load_split(ood, False, data_root, device, normalize_as=dataset)[0][:n]


# -- training ----------------------------------------------------------------------------------
def train(task: str, method: str, flags: list[str], seed: int, data: Data, args: argparse.Namespace,
          epochs: int) -> Run:
    """Train one network as ``train.py`` would (``runner.Run``; IVON on the deterministic net)."""
    extra = [*flags, *(["--subset", str(args.subset)] if args.subset else [])]
    opt = options(TASKS[task], METHODS[method], seed, *extra, device=args.device, data_root=args.data_root)
    run = Run(opt, METHODS[method], data.train, ivon_lr=IVON_LR)
    diverged = run.train(epochs, lambda epoch, result: print(
        f"    {method} seed {seed} epoch {epoch}/{epochs}: {result['seconds']:.1f}s", flush=True))
    if diverged:
        raise RuntimeError(f"{method} seed {seed}: {diverged}")
    return run


# -- predictives -------------------------------------------------------------------------------
class Predictor:
    """``probs(images, samples)``: the method's predictive (``samples=0``: its single network / mean weights)."""

    def __init__(self, fn, has_mean: bool, stds: Tensor | None = None) -> None:
        self.fn, self.has_mean, self.stds = fn, has_mean, stds

    def probs(self, images: Tensor, samples: int) -> Tensor:
        return self.fn(images, samples)


def ngvi_predictor(run: Run, epoch: int) -> Predictor:
    first = next(iter(bayesian_layers(run.model)))[1]
    return Predictor(lambda x, s: run.predict(x, s, epoch), True, first.weight_std().flatten().detach().cpu())


def adam_predictor(model: nn.Module) -> Predictor:
    return Predictor(lambda x, s: predict(model, x, 0), False)


def ivon_predictor(run: Run, epoch: int) -> Predictor:
    first = next(p for p in run.model.parameters() if p.dim() > 1)
    return Predictor(lambda x, s: run.predict(x, s, epoch), True, run.optimizer.weight_std(first).detach().cpu())


def ensemble_predictor(models: list[nn.Module]) -> Predictor:
    return Predictor(lambda x, s: sum(predict(m, x, 0) for m in models) / len(models), False)


def laplace_predictor(model: nn.Module, data: Data, batch_size: int) -> tuple[Predictor, float]:
    from laplace import Laplace

    model.eval()
    train = torch.utils.data.TensorDataset(*data.train)
    la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron")
    la.fit(torch.utils.data.DataLoader(train, batch_size=batch_size))
    la.optimize_prior_precision(method="marglik")

    @torch.no_grad()
    def probs(images: Tensor, samples: int) -> Tensor:
        if samples == 0:
            return torch.cat([model(images[i:i + 1000]) for i in range(0, images.shape[0], 1000)]).softmax(-1)
        return torch.cat([la(images[i:i + 1000], pred_type="glm", link_approx="probit")
                          for i in range(0, images.shape[0], 1000)])

    prior = la.prior_precision
    return Predictor(probs, True, None), float(prior.mean() if torch.is_tensor(prior) else prior)


# -- scores ------------------------------------------------------------------------------------
def score(pred: Predictor, data: Data, samples: int = TEST_SAMPLES) -> dict:
    """Clean, per-angle and OOD scores of the MC predictive, and at the mean weights where there are any."""
    out: dict = {}
    variants = [("", samples)] + ([("_mean", 0)] if pred.has_mean else [])
    for suffix, samples in variants:
        probs_in = None
        for angle in ANGLES:
            x, y = data.shifted[angle]
            probs = pred.probs(x, samples).double()
            if angle == 0:
                probs_in = probs
            out[f"acc{suffix}@{angle}"] = accuracy(probs, y)
            out[f"nll{suffix}@{angle}"] = nll(probs, y)
            out[f"ece{suffix}@{angle}"] = ece(probs, y)
        probs_out = pred.probs(data.ood, samples).double()
        out[f"ood_auroc{suffix}"] = auroc(predictive_entropy(probs_out), predictive_entropy(probs_in))
    if pred.stds is not None:
        q = torch.quantile(pred.stds.double(), torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64))
        out["std_p0"], out["std_p10"], out["std_p50"], out["std_p90"], out["std_p100"] = q.tolist()
        out["std_p90_over_p10"] = out["std_p90"] / out["std_p10"]
    return out


# -- the study ---------------------------------------------------------------------------------
def run_key(task: str, name: str, seed: int, epochs: int, subset: int | None) -> str:
    return f"{task}|{name}|{seed}|{epochs}" + (f"|subset{subset}" if subset else "")  # --test_subset: quick only


def run_task(task_name: str, methods: dict[str, tuple[str, list[str]]], seeds: list[int], args,
             store: Store) -> None:
    """Every run of ``task_name`` the store lacks (``--force``: every run): each seed of each named method."""
    task = TASKS[task_name]
    epochs = args.epochs or EPOCHS[task_name]
    data = None
    adam = {"seed": None, "models": {}}  # the current seed's Adam networks, shared by Adam, Laplace and Ensemble

    def adam_models(seed: int, members: list[int]) -> dict[int, nn.Module]:
        if adam["seed"] != seed:
            adam["seed"], adam["models"] = seed, {}
        for s in members:
            if s not in adam["models"]:
                adam["models"][s] = train(task_name, "Adam", [], s, data, args, epochs).model
        return adam["models"]

    def one(task_name: str, name: str, seed: int) -> dict:
        nonlocal data
        data = data or Data(task_name, args.data_root, torch.device(args.device), args.subset, args.test_subset)
        method, flags = methods[name]
        t0 = time.perf_counter()
        print(f"{task_name} {name} seed {seed} ({epochs} epochs)", flush=True)
        record = {"task": task_name, "name": name, "method": method, "flags": flags, "seed": seed,
                  "epochs": epochs}
        if method in ("Adam", "Laplace", "Ensemble"):
            members = [seed + 100 * k for k in range(ENSEMBLE_SIZE if method == "Ensemble" else 1)]
            models = adam_models(seed, members)
            if method == "Adam":
                pred = adam_predictor(models[seed])
            elif method == "Ensemble":
                pred = ensemble_predictor([models[s] for s in members])
            else:
                pred, record["laplace_prior_precision"] = laplace_predictor(models[seed], data, task.batch_size)
        else:
            run = train(task_name, method, flags, seed, data, args, epochs)
            pred = ivon_predictor(run, epochs) if method == "IVON" else ngvi_predictor(run, epochs)
            if method != "IVON":
                record["options"] = {k: getattr(run.opt, k, None) for k in (
                    "lr", "momentum", "beta2", "kl_weight", "prior_var", "damping", "init_precision", "warm_start",
                    "fisher", "kl_clip", "kfac_rank")}
        record["scores"] = score(pred, data, args.test_samples)
        record["test_samples"] = args.test_samples
        record["seconds"] = time.perf_counter() - t0
        s = record["scores"]
        print(f"  -> acc {s['acc@0']:.4f} nll {s['nll@0']:.4f} ece {s['ece@0']:.4f} | 30deg nll "
              f"{s['nll@30']:.3f} ece {s['ece@30']:.3f} | 60deg nll {s['nll@60']:.3f} | ood "
              f"{s['ood_auroc']:.3f} (mean w {s.get('ood_auroc_mean', float('nan')):.3f}) | std p90/p10 "
              f"{s.get('std_p90_over_p10', float('nan')):.2f} | {record['seconds']:.0f}s", flush=True)
        return record

    Study([task_name], list(methods), seeds).run(
        store, lambda task, name, seed: run_key(task, name, seed, epochs, args.subset), one,
        done=lambda *_: not args.force)


COLUMNS = [("acc %", "acc@0", ".2f", 100), ("NLL", "nll@0", ".4f", 1), ("ECE", "ece@0", ".4f", 1),
           ("NLL 30°", "nll@30", ".3f", 1), ("ECE 30°", "ece@30", ".3f", 1), ("NLL 60°", "nll@60", ".3f", 1),
           ("ECE 60°", "ece@60", ".3f", 1), ("OOD AUROC", "ood_auroc", ".3f", 1),
           ("OOD AUROC, mean w", "ood_auroc_mean", ".3f", 1), ("NLL 60°, mean w", "nll_mean@60", ".3f", 1),
           ("std p90/p10", "std_p90_over_p10", ".2f", 1)]


def report(store: dict, path_md: Path, plot_dir: Path) -> str:
    lines = ["# Uncertainty benchmark", "",
             "Generated by `bench/uncertainty.py` from `bench/results/uncertainty.json`;",
             "the protocol is in `docs/uncertainty.md`. Mean ± sd over the seeds (n = seeds).", ""]
    by_task: dict[str, dict[str, list[dict]]] = {}
    for _, run in sorted(store["runs"].items()):
        by_task.setdefault(f"{run['task']} ({run['epochs']} epochs)", {}).setdefault(run["name"], []).append(run)
    for task, names in by_task.items():
        lines += [f"## {task}", ""]
        rows = []
        for name, runs in names.items():
            row = [name, str(len(runs))]
            for _, key, fmt, scale in COLUMNS:
                row.append(mean_sd([r["scores"].get(key) for r in runs], fmt, scale, missing=""))
            rows.append(row)
        lines += [table(["method", "n", *[c[0] for c in COLUMNS]], rows), ""]
        flags = {name: " ".join(runs[0]["flags"]) for name, runs in names.items() if runs[0]["flags"]}
        for name, f in flags.items():
            lines.append(f"- `{name}`: `{f}`")
        lines.append("")
        _plot(task, names, plot_dir)
    lines += ["## Commands", ""] + [f"    {c}" for c in store.get("commands", [])]
    text = "\n".join(lines) + "\n"
    path_md.write_text(text)
    return text


def _plot(task: str, names: dict[str, list[dict]], plot_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    most = max(len(runs) for runs in names.values())
    for name, runs in names.items():
        if len(runs) < most:  # the study's main rows (every seed); one-seed explorations stay in the table
            continue
        for ax, metric in zip(axes, ("acc", "nll", "ece")):
            ys = [statistics.mean(r["scores"][f"{metric}@{a}"] for r in runs) for a in ANGLES]
            ax.plot(ANGLES, ys, marker="o", ms=3, label=name)
    for ax, title in zip(axes, ("accuracy", "NLL", "ECE")):
        ax.set_xlabel("rotation (degrees)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"{task}: rotated test set (mean of {most} seeds)")
    fig.tight_layout()
    slug = task.split(" ")[0]
    fig.savefig(plot_dir / f"uncertainty_{slug}.png", dpi=110)
    plt.close(fig)

    # the trade-off a default is chosen on: clean log loss against OOD detection and the 30-degree shift
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    means = {name: {k: statistics.mean(r["scores"][k] for r in runs) for k in ("nll@0", "ood_auroc", "nll@30")}
             for name, runs in names.items()}
    best = min(m["nll@0"] for m in means.values())
    left_out = [name for name, m in means.items() if m["nll@0"] > 2 * best]  # failed runs would squash the axes
    for name, runs in names.items():
        if name in left_out:
            continue
        mean = means[name]
        ours = runs[0]["method"] in OURS
        for ax, key in zip(axes, ("ood_auroc", "nll@30")):
            ax.scatter(mean["nll@0"], mean[key], marker="o" if ours else "s", color=None if ours else "k")
            ax.annotate(name, (mean["nll@0"], mean[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for ax, label in zip(axes, ("OOD AUROC (higher is better)", "NLL at 30 degrees (lower is better)")):
        ax.set_xlabel("clean NLL (lower is better)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    note = f"; off the axes (clean NLL > 2x the best): {', '.join(left_out)}" if left_out else ""
    fig.suptitle(f"{task}: clean fit against uncertainty (squares: peers){note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(plot_dir / f"uncertainty_{slug}_tradeoff.png", dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", default=None)
    parser.add_argument("--tasks", nargs="+", choices=tuple(EPOCHS), default=["mnist_mlp"])
    parser.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS),
                        help=f"of {', '.join(PEERS + OURS)}")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=METHOD:FLAGS",
                        help="one of our methods with extra train.py flags")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--first_seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="override the task's epochs")
    parser.add_argument("--subset", type=int, default=None, help="train on this many examples (a quick check)")
    parser.add_argument("--test_subset", type=int, default=None,
                        help="score the first N images of each test and OOD set (a quick check)")
    parser.add_argument("--test_samples", type=int, default=TEST_SAMPLES, help="weight samples of the predictive")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--force", action="store_true", help="re-run runs already in the results")
    parser.add_argument("--out", default=str(RESULTS / "uncertainty.json"))
    parser.add_argument("--md", default=str(REPO / "docs" / "results_uncertainty.md"))
    parser.add_argument("--report_only", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    path = Path(args.out)
    store = Store(path, commands=[])
    if not args.report_only:
        methods: dict[str, tuple[str, list[str]]] = {}
        for m in args.methods:
            if m not in PEERS + OURS:
                raise SystemExit(f"error: unknown method {m!r}; choose from {', '.join(PEERS + OURS)}")
            methods[m] = (m, [])
        for v in args.variant:
            name, _, rest = v.partition("=")
            method, _, flags = rest.partition(":")
            if method not in OURS:
                raise SystemExit(f"error: --variant {v!r}: the method must be one of {', '.join(OURS)}")
            methods[name] = (method, shlex.split(flags))
        line = command("uncertainty.py", sys.argv[1:] if argv is None else argv)
        if line not in store["commands"]:
            store["commands"].append(line)
        store["environment"] = environment(threads=args.threads)
        for task in args.tasks:
            run_task(task, methods, list(range(args.first_seed, args.first_seed + args.seeds)), args, store)
    print(report(store, Path(args.md), path.parent))  # the plots beside the JSON they come from


if __name__ == "__main__":
    main()
