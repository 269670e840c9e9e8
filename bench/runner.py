"""The runner of the bench's studies: declared runs, trained as ``train.py`` trains, scored as ``test.py`` scores.

A study declares its tasks (:class:`Task`: data set, architecture, OOD set), its methods (:class:`Method`:
``train.py`` flags, or IVON) and its seeds (:class:`Study`), and :meth:`Study.run` runs every (task, seed, method)
its :class:`Store` does not hold yet, saving after each, so that an interrupted study resumes where it stopped.

One run (:class:`Run`) is what ``train.py`` does with the method's flags: options from
``option_parser.TrainOptions``, model and optimizer from ``experiment``, the epochs of ``training.train_epoch``.
IVON, the peer from the ``ivon`` package, trains through the same epoch behind :class:`IVONSteps`. The predictive
is ``evaluation.predict``'s (IVON's: :meth:`IVONSteps.predict`, from the same seeds). Reports use one mean ± sd
formatter (:func:`mean_sd`) and one markdown table writer (:func:`md_table`).

The studies whose configurations are ``train.py`` command lines run those verbatim, with ``test.py`` after them
(:func:`run_commands`): what they measure is the commands a user types.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from common import REPO  # also puts the repository on the path, for the imports below
from torch import Tensor, nn

from data import InMemoryLoader, find_data, load_split
from evaluation import default_eval_batch_size, predict, sample_seed
from experiment import finite, make_model, make_optimizer
from option_parser import TrainOptions
from training import Diverged, StepRecords, train_epoch
from util.metrics import accuracy, ece, nll
from util.run_dir import RunDir


# -- what a study declares ------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """A data set and an architecture to train, and the data set whose test split is out of distribution."""

    dataset: str
    arch: str
    ood: str | None = None
    batch_size: int = 100
    flags: tuple[str, ...] = ()  # further train.py flags (e.g. ``--hidden``)


TASKS = {
    "mnist_mlp": Task("MNIST", "mlp", "FashionMNIST"),
    "mnist_covnet": Task("MNIST", "covnet", "FashionMNIST"),
    "fmnist_covnet": Task("FashionMNIST", "covnet", "MNIST"),
    "cifar_lenet5": Task("CIFAR10", "lenet5"),
    "fmnist_resnet20": Task("FashionMNIST", "resnet20", "MNIST", batch_size=128),
}


@dataclass(frozen=True)
class Method:
    """``train.py``'s ``--model``, ``--optimizer`` (None: the model's default) and further flags; with ``ivon``,
    the ``ivon`` package's optimizer trains the model instead (the options still describe the model)."""

    model: str
    optimizer: str | None = None
    flags: tuple[str, ...] = ()
    ivon: bool = False

    @property
    def argv(self) -> list[str]:
        return ["--model", self.model, *(["--optimizer", self.optimizer] if self.optimizer else []), *self.flags]


#: the methods the studies compare: ours, their deterministic baseline, and IVON on the MAP network
METHODS = {
    "Adam": Method("MAP", "adam"),
    "NoisyAdam": Method("FFG", "noisy_adam"),
    "NoisyKFAC": Method("MVG", "noisy_kfac"),
    "VOGN": Method("FFG", "vogn"),
    "IVON": Method("MAP", "adam", ivon=True),
}


@dataclass(frozen=True)
class Study:
    """A study's runs: each task's seeds, each seed's methods (tasks outermost, so a task's data load once; a
    partial task has every method of its first seeds). ``tasks`` of ``(None,)``: the methods' flags name the data."""

    tasks: Sequence[str | None]
    methods: Sequence[str]
    seeds: Sequence[int]

    def run(self, store: Store, key: Callable[[str | None, str, int], str],
            one: Callable[[str | None, str, int], dict],
            done: Callable[[dict, str | None, str, int], bool] = lambda run, task, method, seed: True) -> None:
        """``store.runs[key(task, method, seed)] = one(task, method, seed)`` for each run the store lacks (or whose
        stored run is not ``done(run, task, method, seed)``, e.g. made with other settings), saving after each."""
        for task in self.tasks:
            for seed in self.seeds:
                for method in self.methods:
                    k = key(task, method, seed)
                    if k in store.runs and done(store.runs[k], task, method, seed):
                        continue
                    store.runs[k] = one(task, method, seed)
                    store.save()


# -- the result store ------------------------------------------------------------------------------
class Store:
    """A study's results: one JSON file, ``{"runs": {key: run}, ...}`` (``sections``: the other top-level entries
    and their empty values), rewritten whole after each run. A file whose runs sit at the top level (the older
    layout of the command-line studies) is read as ``{"runs": ...}``."""

    def __init__(self, path: str | Path, **sections: object) -> None:
        self.path = Path(path)
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        if data and "runs" not in data:
            data = {"runs": data}
        data.setdefault("runs", {})
        for name, empty in sections.items():
            data.setdefault(name, empty)
        self.data: dict = data

    @property
    def runs(self) -> dict:
        return self.data["runs"]

    def __getitem__(self, name: str) -> object:
        return self.data[name]

    def __setitem__(self, name: str, value: object) -> None:
        self.data[name] = value

    def get(self, name: str, default: object = None) -> object:
        return self.data.get(name, default)

    def save(self) -> None:
        """Write the file (a temporary beside it, then renamed: an interruption leaves the old file whole)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)


def command(script: str, argv: Sequence[str]) -> str:
    """The command line of a study as it ran, for its report, without ``--data_root`` (a machine's path)."""
    words, skip = [], False
    for w in argv:
        if skip or w.startswith("--data_root="):
            skip = False
            continue
        if w == "--data_root":
            skip = True
            continue
        words.append(w)
    return f"python bench/{script} " + " ".join(shlex.quote(w) for w in words)


# -- report formatting -----------------------------------------------------------------------------
def mean_sd(values: Iterable[float | None], fmt: str, scale: float = 1.0, missing: str = "n/a",
            zero_sd: bool = False) -> str:
    """``mean ± sd`` (sample sd over the seeds) of ``values`` times ``scale``, formatted with ``fmt``; values that
    are None or not finite (not recorded, diverged) are left out. One value is shown alone (``zero_sd``: with
    ``± 0``), none as ``missing``."""
    xs = [v * scale for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return missing
    if len(xs) == 1 and not zero_sd:
        return format(xs[0], fmt)
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{format(statistics.mean(xs), fmt)} ± {format(sd, fmt)}"


def md_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """The lines of a markdown table."""
    return ["| " + " | ".join(header) + " |", "| --- " * len(header) + "|",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


# -- data ------------------------------------------------------------------------------------------
class Data:
    """The splits of the data sets under ``root`` (``--data_root``, else ``$DATA_ROOT`` / ``./data``), each loaded
    once, on ``device``."""

    def __init__(self, root: str | None, device: str = "cpu") -> None:
        self.root, self.device, self.cache = root, device, {}

    def available(self, name: str) -> bool:
        return find_data(name, self.root) is not None

    def split(self, name: str, train: bool, normalize_as: str | None = None) -> tuple[Tensor, Tensor]:
        """``normalize_as``: the training set whose statistics normalise ``name`` (an OOD set, as
        ``test.py --ood_dataset`` scores it); by default ``name``'s own."""
        key = (name, train, normalize_as or name)
        if key not in self.cache:
            self.cache[key] = load_split(name, train, self.root, self.device, normalize_as=normalize_as)
        return self.cache[key]

    def ood_images(self, task: Task) -> Tensor:
        """The test images of ``task.ood`` through ``task.dataset``'s normalisation, as a model trained on it sees
        them (and as ``test.py --ood_dataset`` scores them)."""
        return self.split(task.ood, False, normalize_as=task.dataset)[0]


# -- one run ---------------------------------------------------------------------------------------
def options(task: Task, method: Method, seed: int, *flags: str, device: str = "cpu",
            data_root: str | None = None) -> argparse.Namespace:
    """The options ``train.py`` parses for this run: the method's flags, the task's, then ``flags``."""
    argv = [*method.argv, "--dataset", task.dataset, "--arch", task.arch, *task.flags, "--seed", str(seed),
            "--batch_size", str(task.batch_size), "--device", device, "--no_visdom", "--no_progress", *flags]
    if data_root:
        argv += ["--data_root", data_root]
    return TrainOptions().parse(argv)


def scores(probs: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy, log loss (NLL) and ECE (15 bins) of a predictive."""
    return {"acc": accuracy(probs, labels), "nll": nll(probs, labels), "ece": ece(probs, labels)}


def build(opt: argparse.Namespace, method: Method, n: int, ivon_lr: float | None = None
          ) -> tuple[nn.Module, torch.optim.Optimizer | IVONSteps]:
    """The model of ``opt`` (made after seeding the global RNG with ``opt.seed``) and its optimizer:
    ``experiment.make_optimizer``'s, or IVON at ``ivon_lr`` with ``ess = n``."""
    torch.manual_seed(opt.seed)
    model = make_model(opt).to(torch.device(opt.device))
    return model, IVONSteps(model, ivon_lr, ess=n) if method.ivon else make_optimizer(opt, model)


class Run:
    """One network trained as ``train.py`` trains it with ``opt`` on ``train_set``: the seeded in-memory loader,
    the model and optimizer of ``experiment`` (IVON: :class:`IVONSteps` at ``ivon_lr``, ``ess`` = the training-set
    size), the global seed set before the model and again before the first epoch, and ``train_epoch``."""

    def __init__(self, opt: argparse.Namespace, method: Method, train_set: tuple[Tensor, Tensor],
                 ivon_lr: float | None = None) -> None:
        self.opt, self.method = opt, method
        self.device = torch.device(opt.device)
        self.loader = InMemoryLoader(*train_set, opt.batch_size, shuffle=True, seed=opt.seed, augment=opt.augment)
        self.model, self.optimizer = build(opt, method, train_set[0].shape[0], ivon_lr)
        torch.manual_seed(opt.seed)

    def train(self, epochs: int, after_epoch: Callable[[int, dict], None] | None = None) -> str | None:
        """Train ``epochs`` epochs, calling ``after_epoch(epoch, train_epoch's result)`` after each; return why the
        run diverged (a non-finite loss or weights), or None."""
        for epoch in range(1, epochs + 1):
            try:
                result = train_epoch(self.model, self.optimizer, self.loader, epoch, None,
                                     StepRecords(self.opt.log_interval, self.device), samples=self.opt.train_samples,
                                     log_interval=self.opt.log_interval)
            except Diverged as e:
                return str(e)
            if not finite(self.model):
                return f"non-finite weights after epoch {epoch}"
            if after_epoch is not None:
                after_epoch(epoch, result)
        return None

    def predict(self, images: Tensor, samples: int, epoch: int) -> Tensor:
        """The predictive over the ``samples`` networks of (the run's seed, ``epoch``) (0: the mean weights)."""
        if isinstance(self.optimizer, IVONSteps):
            return self.optimizer.predict(images, samples, self.opt.seed, epoch)
        return predict(self.model, images, samples, self.opt.seed, epoch)


# -- IVON, the peer every study runs -----------------------------------------------------------------
def ivon_defaults() -> dict:
    """IVON's settings besides ``lr`` and ``ess``: the ``ivon`` package's defaults (recorded with the runs)."""
    import ivon

    return {k: v.default for k, v in inspect.signature(ivon.IVON).parameters.items()
            if k in ("hess_init", "weight_decay", "beta1", "beta2", "mc_samples")}


class IVONSteps:
    """``ivon.IVON`` behind the step interface that ``training.train_step`` drives.

    IVON's own step is ``zero_grad``; the forward and backward inside ``sampled_params(train=True)`` (the weights
    drawn on entering, the gradient collected into its estimates and the means put back on leaving); ``step``.
    Here :meth:`zero_grad` enters that context and :meth:`step` leaves it before IVON's update, so ``train_epoch``
    runs exactly that loop. A step must follow each ``zero_grad``.
    """

    def __init__(self, model: nn.Module, lr: float, ess: int) -> None:
        import ivon

        self.model = model
        self.ivon = ivon.IVON(model.parameters(), lr=lr, ess=ess)
        self._sampled = None

    @property
    def param_groups(self) -> list[dict]:
        return self.ivon.param_groups

    def zero_grad(self) -> None:
        self.ivon.zero_grad()
        self._sampled = self.ivon.sampled_params(train=True)
        self._sampled.__enter__()

    def step(self) -> None:
        sampled, self._sampled = self._sampled, None
        sampled.__exit__(None, None, None)
        self.ivon.step()

    @torch.no_grad()
    def predict(self, images: Tensor, samples: int, seed: int = 0, epoch: int = 0) -> Tensor:
        """IVON's predictive: the mean of the softmax over ``samples`` weight draws (log-mean-exp); 0: the means.

        Draw ``s`` is IVON's own sampler run from ``evaluation.sample_seed(seed, epoch, s)`` (the global RNG forked
        and restored), so that, as for ``evaluation.predict``, the test and OOD sets see the same networks.
        """
        model = self.model
        model.eval()
        if samples == 0:
            return torch.cat([model(images[i:i + 1000]) for i in range(0, images.shape[0], 1000)]).softmax(-1)
        batch_size = default_eval_batch_size(images.device)
        logps = []
        for s in range(samples):
            with torch.random.fork_rng(devices=[] if images.device.type == "cpu" else None):
                torch.manual_seed(sample_seed(seed, epoch, s))
                with self.ivon.sampled_params():
                    logps.append(torch.cat([F.log_softmax(model(images[i:i + batch_size]), dim=-1)
                                            for i in range(0, images.shape[0], batch_size)]))
        return (torch.logsumexp(torch.stack(logps), dim=0) - math.log(samples)).exp()

    def weight_std(self, param: Tensor) -> Tensor:
        """The posterior std of ``param``'s entries, ``1 / sqrt(ess (h + weight decay))`` (IVON keeps one flat
        ``h`` per group, in parameter order)."""
        group = self.ivon.param_groups[0]
        offset = 0
        for p in group["params"]:
            if p is param:
                break
            offset += p.numel()
        hess = group["hess"][offset:offset + param.numel()]
        return 1.0 / torch.sqrt(group["ess"] * (hess + group["weight_decay"]))


# -- the studies of train.py command lines -------------------------------------------------------------
def _finished(run_dir: Path, argv: list[str], epochs: int) -> bool:
    """Whether ``run_dir`` holds the epoch-``epochs`` checkpoint of ``train.py argv`` (its options as that command
    resolves them, but for the epoch count, which a longer run's earlier checkpoint shares)."""
    run = RunDir(run_dir)
    if not (run.checkpoint(epochs).exists() and (run_dir / "opt.json").exists()):
        return False
    want = vars(TrainOptions().parse(argv))
    have = json.loads((run_dir / "opt.json").read_text())
    where = ("epoch", "resume", "explicit", "name", "ckpt_dir", "run_dir", "data_root")
    return all(have.get(k) == v for k, v in want.items() if k not in where)


@dataclass
class CommandRun:
    """A ``train.py`` run and ``test.py`` on it: test.py's JSON line, the run's epoch records, its last
    checkpoint and the two commands (without where they wrote)."""

    test: dict
    epochs: list[dict]
    checkpoint: Path
    command: str
    test_command: str

    def summary(self) -> dict:
        """test.py's scores, the epoch-1 test accuracy, the median s/epoch and the commands."""
        return {**self.test, "epoch1_test_acc": self.epochs[0]["test_acc"],
                "sec_per_epoch_median": statistics.median(r["sec_per_epoch"] for r in self.epochs),
                "command": self.command, "test_command": self.test_command}


def commands_parser(doc: str, configs: Sequence[str], seeds: int | None = None) -> argparse.ArgumentParser:
    """The command line of a study of ``train.py`` commands: ``--data_root``, ``--only`` (some of ``configs``),
    ``--seeds`` (default ``seeds``; None: a study without seeds), ``--num_threads`` and ``--report_only``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", default=None)
    p.add_argument("--only", nargs="+", choices=tuple(configs), default=list(configs))
    if seeds is not None:
        p.add_argument("--seeds", type=int, default=seeds)
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--report_only", action="store_true", help="only print the report of the stored results")
    return p


def run_commands(name: str, flags: list[str], epochs: int | None, ckpt_dir: Path, data_root: str | None,
                 threads: int, test_flags: Sequence[str] = (), quiet: bool = False) -> CommandRun:
    """``train.py`` with ``flags`` (and ``--epoch=epochs``; None: train.py's default), then ``test.py
    --epoch=N`` with ``test_flags`` on the run, in ``ckpt_dir/name``, with ``threads`` torch threads and no
    dashboard. ``quiet``: train.py's output is not shown. A run whose epoch-N checkpoint is already in
    ``ckpt_dir/name`` with the same options is only tested (a kept ``ckpt_dir`` resumes a study)."""
    where = ["--ckpt_dir", str(ckpt_dir), "--name", name, "--num_threads", str(threads)]
    if data_root:
        where += ["--data_root", data_root]
    epoch_flag = [] if epochs is None else [f"--epoch={epochs}"]
    epochs = epochs or TrainOptions().parse(flags + ["--no_visdom"]).epoch
    train = [sys.executable, "train.py", *flags, *epoch_flag, "--no_visdom", "--no_progress", *where]
    if not _finished(ckpt_dir / name, train[2:], epochs):
        print("$", " ".join(train[1:]), flush=True)
        subprocess.run(train, cwd=REPO, check=True, stdout=subprocess.DEVNULL if quiet else None)
    test = [sys.executable, "test.py", f"--epoch={epochs}", *test_flags, *where]
    out = subprocess.run(test, cwd=REPO, check=True, capture_output=True, text=True).stdout
    run = RunDir(ckpt_dir / name)
    return CommandRun(test=json.loads(out.strip().splitlines()[-1]),
                      epochs=[r for r in run.read_metrics() if r["kind"] == "epoch"],
                      checkpoint=run.checkpoint(epochs),
                      command=" ".join(["python train.py", *flags, *epoch_flag]),
                      test_command=" ".join(["python test.py", f"--epoch={epochs}", *test_flags]))
