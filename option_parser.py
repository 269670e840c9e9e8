"""Command-line options for train.py and test.py.

Follows the pytorch-CycleGAN-and-pix2pix pattern: ``BaseOptions`` defines the
flags shared by both scripts, ``TrainOptions`` and ``TestOptions`` add their
own, and ``.parse(argv=None)`` returns an ``argparse.Namespace`` with every
derived default filled in and every flag validated.  Mistakes end the program
with exactly one line ``error: <message>`` on stderr and exit status 2 (no
usage dump, no traceback).

Derived defaults (left ``None`` on the command line, filled in by ``parse``):

* ``optimizer`` follows ``model``: FFG -> noisy_adam, MVG -> noisy_kfac, MAP -> adam (the first optimizer
  registered for the model's posterior, ``optimizers.registry``)
* ``arch`` follows ``dataset``: MNIST/FashionMNIST -> mlp, CIFAR10 -> lenet5
* ``n`` = training-set size (or ``--subset``); ``initial_size`` = C*H*W;
  ``label_size`` = number of classes; ``device``: auto -> cuda if available;
  ``eval_batch_size``: per device and ``--num_threads`` (``evaluation.default_eval_batch_size``)
* train: ``name`` = ``{dataset}_{model}_{optimizer}_{arch}``
* test: ``name`` = latest run under ``--ckpt_dir`` (of ``--model`` if given),
  ``epoch`` = its latest checkpoint, and the options that define the trained
  model (model, optimizer, arch, hidden, dataset, n, ...) and ``data_root``
  are taken from the run's ``opt.json`` unless given on the command line.

Optimizer options (``lr``, ``momentum``, ``damping``, ...: the flags the registered optimizers declare,
``optimizers.registry``) default to the defaults of the optimizer class they configure (read from its
signature) and are filled in by ``parse``; one the chosen optimizer does not take stays ``None``, and is an
error when given.  Their values are checked by the class itself (``experiment.check_optimizer_options``).
``data_root`` becomes the folder the data set was found in (or would be downloaded to).  So ``opt.txt``,
``opt.json``, the console and the dashboard show the values the run used.

Training-only flags (the optimizer's, the schedule's, visdom's, ...) are not flags of test.py: it takes
the run's values from its ``opt.json`` (options saved as ``None`` by older runs are resolved as above),
and a training flag given to it is a one-line error.

Extra attributes set by ``parse``: ``is_train`` (bool), ``explicit`` (sorted
names of the options given on the command line), ``run_dir``
(``<ckpt_dir>/<name>``).  ``parse`` has no side effects (it does not apply
``--num_threads`` or create directories).

Note on ``--lr_schedule``: the seed's MVG command decayed the learning rate
x0.1 every 30 epochs; the default here is ``none`` for every model, so pass
``--lr_schedule step`` (``--lr_decay 0.1 --lr_step 30`` are the defaults) to
reproduce it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from data.datasets import DATASETS, resolve_data_root
from evaluation import default_eval_batch_size
from experiment import check_optimizer_options, resolve_optimizer_options
from models import ARCHS, NORMALIZED_ARCHS, POSTERIORS
from optimizers.base import AUTO
from optimizers.registry import FLAGS, OPTIMIZERS, compatible_optimizers, default_optimizers, option_names
from util.checkpoint import latest_epoch, list_epochs
from util.distributed import DIST_TIMEOUT_S
from util.errors import UserError, one_line
from util.run_dir import RunDir, latest_run, list_runs

__all__ = [
    "BaseOptions",
    "DEFAULT_ARCH",
    "TestOptions",
    "TrainOptions",
    "format_options",
    "print_options",
    "save_options",
]

DEFAULT_ARCH = {"MNIST": "mlp", "FashionMNIST": "mlp", "CIFAR10": "lenet5"}
# Options that define a trained model, beside the optimizer's; test.py takes them from the run's opt.json.
_MODEL_KEYS = ("model", "optimizer", "arch", "hidden", "dataset", "n", "initial_size", "label_size", "train_samples")
# Also taken from the run when not given: where the training data was found (if it
# has no data now, the usual $DATA_ROOT / ./data search still follows).
_INHERITED_AT_TEST = ("data_root",)
# Of run_keys(), the ones that must not be changed at test time (the weights would not fit).
_FIXED_AT_TEST = ("model", "optimizer", "arch", "hidden", "dataset")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` except where the default is ``None`` (derived; the help text says how)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def run_keys() -> tuple[str, ...]:
    """The options test.py takes from the run: the model's and every optimizer flag."""
    return _MODEL_KEYS + option_names()


def _per_optimizer(key: str) -> str:
    """The default of option ``key`` of each optimizer that takes it, e.g. ``noisy_adam 0.003, adam 0.001``, and
    where it differs on a network with normalisation layers (``--arch resnet20``)."""
    values = {name: entry.defaults().get(key) for name, entry in OPTIMIZERS.items()}
    values = {name: v for name, v in values.items() if v is not None}
    if not values:
        return "default: none"
    if len(set(map(str, values.values()))) == 1:
        text = f"default: {next(iter(values.values()))}"
    else:
        text = "default: " + ", ".join(f"{name} {v}" for name, v in values.items())
    normalized = {name: entry.normalized_defaults()[key] for name, entry in OPTIMIZERS.items()
                  if key in entry.normalized_defaults()}
    if normalized:
        text += "; with --arch " + "/".join(NORMALIZED_ARCHS) + ": " + ", ".join(
            f"{name} {v}" for name, v in normalized.items())
    return text


class _ArgumentParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line ``error: <msg>`` and exit status 2."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        sys.stderr.write(f"error: {one_line(message)}\n")
        sys.exit(2)


def _hidden_sizes(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid hidden sizes {text!r}; use positive integers like 100 or 400,400"
        ) from None
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(
            f"invalid hidden sizes {text!r}; use positive integers like 100 or 400,400"
        )
    return sizes


def _resolve_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available on this machine; use --device cpu or auto")
    return choice


class BaseOptions:
    """Flags shared by train.py and test.py."""

    is_train = False

    def __init__(self) -> None:
        self.parser: argparse.ArgumentParser | None = None

    # -- definition ---------------------------------------------------------

    def initialize(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add the shared flags to ``parser``."""
        g = parser.add_argument_group("model")
        g.add_argument("--model", choices=POSTERIORS, default="FFG",
                       help="posterior: FFG (fully factorized Gaussian), MVG (matrix-variate Gaussian), MAP")
        g.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default=None,
                       help="default follows --model: "
                            + ", ".join(f"{model}->{name}" for model, name in default_optimizers().items()))
        g.add_argument("--arch", choices=ARCHS, default=None,
                       help="default by data set: MNIST/FashionMNIST->mlp, CIFAR10->lenet5")
        g.add_argument("--hidden", type=_hidden_sizes, nargs="+", default=None, metavar="SIZES",
                       help="mlp hidden layer sizes, e.g. 100 or 400,400 (default 100; --arch mlp only)")
        g.add_argument("--initial_size", type=int, default=None,
                       help="flattened input size (default C*H*W of the data set; must match it)")
        g.add_argument("--label_size", type=int, default=None,
                       help="number of classes (default from the data set; must match it)")
        g.add_argument("--test_samples", type=int, default=10,
                       help="Monte Carlo samples at evaluation (0 = use the mean weights)")
        g.add_argument("--eval_batch_size", type=int, default=None,
                       help="test examples per evaluation forward; a speed setting only, the predictive does not "
                            f"depend on it (default: per device, cpu {default_eval_batch_size('cpu', 1)} per thread, "
                            f"cuda {default_eval_batch_size('cuda')})")

        g = parser.add_argument_group("data")
        g.add_argument("--dataset", choices=tuple(DATASETS), default="MNIST", help="data set (test.py: the run's)")
        g.add_argument("--data_root", default=None,
                       help="folder with the data sets (default: $DATA_ROOT, then ./data; test.py: the run's)")

        g = parser.add_argument_group("run")
        g.add_argument("--seed", type=int, default=0,
                       help="random seed: initial weights, data order, weight noise (test.py: its weight samples)")
        g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
        g.add_argument("--num_threads", type=int, default=None,
                       help="torch intra-op threads (default: torch's default; under torchrun on CPU, "
                            "the cores divided by the ranks per machine)")
        g.add_argument("--ckpt_dir", default="checkpoints", help="where runs are saved")
        g.add_argument("--name", default=None, help="experiment name (a folder under --ckpt_dir)")
        return parser

    def build_parser(self) -> argparse.ArgumentParser:
        """A fresh parser with all of this class's flags."""
        script = "train.py" if self.is_train else "test.py"
        parser = _ArgumentParser(prog=script, allow_abbrev=False, formatter_class=_HelpFormatter)
        return self.initialize(parser)

    # -- parsing ------------------------------------------------------------

    def gather_options(self, argv: list[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
        """Parse ``argv``; return the namespace and the names given explicitly."""
        self.parser = self.build_parser()
        opt = self.parser.parse_args(argv)
        if opt.hidden is not None:  # nargs="+" of comma lists: --hidden 400,400 or --hidden 400 400
            opt.hidden = [s for group in opt.hidden for s in group]
        probe = self.build_parser()
        for action in probe._actions:  # a flag absent from argv leaves no attribute
            action.default = argparse.SUPPRESS
        explicit = set(vars(probe.parse_args(argv)))
        return opt, explicit

    def parse(self, argv: list[str] | None = None) -> argparse.Namespace:
        """Parse, fill in derived defaults and validate; exits 2 with one line on error."""
        opt, explicit = self.gather_options(argv)
        assert self.parser is not None
        try:
            opt.is_train = self.is_train
            opt.explicit = sorted(explicit)
            self._check_ranges(opt)
            self.resolve(opt, explicit)
            self._check_consistency(opt)
        except UserError as e:
            self.parser.error(str(e))
        return opt

    # -- hooks --------------------------------------------------------------

    def resolve(self, opt: argparse.Namespace, explicit: set[str]) -> None:
        """Fill in derived defaults (subclasses extend this)."""
        info = DATASETS[opt.dataset]
        if opt.hidden is None:
            opt.hidden = [100]
        if opt.optimizer is None:
            opt.optimizer = default_optimizers()[opt.model]
        if opt.arch is None:
            opt.arch = DEFAULT_ARCH[opt.dataset]
        resolve_optimizer_options(opt)  # the optimizer class's own defaults (None: not an option it takes)
        if opt.initial_size is None:
            opt.initial_size = info.input_size
        if opt.label_size is None:
            opt.label_size = info.num_classes
        if getattr(opt, "n", None) is None:
            opt.n = getattr(opt, "subset", None) or info.train_size
        opt.device = _resolve_device(opt.device)
        if opt.eval_batch_size is None:
            opt.eval_batch_size = default_eval_batch_size(opt.device, opt.num_threads)

    def _check_ranges(self, opt: argparse.Namespace) -> None:
        need = _need

        need(opt.test_samples >= 0, f"--test_samples must be >= 0 (0 = mean weights), got {opt.test_samples}")
        need(opt.eval_batch_size is None or opt.eval_batch_size >= 1,
             f"--eval_batch_size must be a positive integer (omit it for the device's default), "
             f"got {opt.eval_batch_size}")
        need(opt.num_threads is None or opt.num_threads >= 1,
             f"--num_threads must be a positive integer, got {opt.num_threads}")
        need(not opt.name or ("/" not in opt.name and opt.name not in (".", "..")),
             f"--name must be a plain folder name (no '/'), got {opt.name!r}")

    def _check_consistency(self, opt: argparse.Namespace) -> None:
        if "hidden" in opt.explicit and opt.arch != "mlp":
            raise UserError(f"--hidden sets the mlp's hidden sizes and does not apply to --arch {opt.arch}; "
                            "drop --hidden or use --arch mlp")
        allowed = compatible_optimizers(opt.model)
        if opt.optimizer not in allowed:
            raise UserError(
                f"--model {opt.model} cannot be trained with --optimizer {opt.optimizer} "
                f"({opt.optimizer} trains --model {OPTIMIZERS[opt.optimizer].posterior}); "
                f"use --optimizer {' or '.join(allowed)}"
            )
        info = DATASETS[opt.dataset]
        if opt.initial_size != info.input_size:
            c, s = info.in_channels, info.image_size
            raise UserError(
                f"--initial_size {opt.initial_size} does not match {opt.dataset} inputs "
                f"({c}x{s}x{s} = {info.input_size}); omit --initial_size"
            )
        if opt.label_size != info.num_classes:
            raise UserError(
                f"--label_size {opt.label_size} does not match {opt.dataset} "
                f"({info.num_classes} classes); omit --label_size"
            )


def _check_optimizer_flags(opt: argparse.Namespace) -> None:
    """Each optimizer flag given is one the optimizer takes, with a value it accepts (its class checks them)."""
    entry = OPTIMIZERS[opt.optimizer]
    for flag in option_names():
        if flag in opt.explicit and flag not in entry.flags:
            by_model: dict[str, list[str]] = {}
            for name, e in OPTIMIZERS.items():
                if flag in e.flags:
                    by_model.setdefault(e.posterior, []).append(name)
            takers = " or ".join(f"{' or '.join(names)} (--model {model})" for model, names in by_model.items())
            raise UserError(f"--{flag} is not an option of --optimizer {opt.optimizer}; drop --{flag}, or use "
                            f"--optimizer {takers}")
    if "prior_every" in opt.explicit and opt.prior_var != AUTO:
        raise UserError("--prior_every sets how often --prior_var auto re-estimates eta; add --prior_var auto "
                        "or drop --prior_every")
    check_optimizer_options(opt)


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise UserError(msg)


class TrainOptions(BaseOptions):
    """Flags of train.py."""

    is_train = True

    def initialize(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add the shared flags plus the training flags."""
        parser = super().initialize(parser)
        g = parser.add_argument_group("optimizer (each default is the optimizer class's own)")
        for name in option_names():
            flag = FLAGS[name]
            g.add_argument(f"--{name}", type=flag.type, choices=flag.choices, default=None,
                           help=flag.help.format(default=_per_optimizer(name)) if "{default}" in flag.help
                           else flag.help)
        g.add_argument("--n", type=int, default=None,
                       help="training-set size N in the ELBO (default: the real size, or --subset)")
        g.add_argument("--train_samples", type=int, default=1, help="Monte Carlo samples per training step")

        g = parser.add_argument_group("training")
        g.add_argument("--batch_size", type=int, default=100, help="training examples per step (per rank)")
        g.add_argument("--subset", type=int, default=None,
                       help="use only N training examples (first N after a seeded shuffle)")
        g.add_argument("--epoch", type=int, default=20, help="number of epochs to train")
        g.add_argument("--lr_schedule", choices=("none", "step", "exponential", "cosine"), default="none",
                       help="learning-rate schedule (the seed's MVG run used: step, x0.1 every 30 epochs)")
        g.add_argument("--lr_decay", type=float, default=0.1,
                       help="factor per --lr_step epochs (step) or per epoch (exponential)")
        g.add_argument("--lr_step", type=int, default=30, help="epochs between step decays")
        g.add_argument("--resume", action="store_true",
                       help="continue the run --name from its latest checkpoint")
        g.add_argument("--log_interval", type=int, default=100, help="iterations between iteration records")
        g.add_argument("--augment", action="store_true", help="random crop + flip (CIFAR10 only)")
        g.add_argument("--no_progress", action="store_true",
                       help="no progress bar (without a terminal there is one line per epoch anyway)")
        g.add_argument("--dist_timeout", type=float, default=DIST_TIMEOUT_S, metavar="SECONDS",
                       help="under torchrun: how long a rank waits for the others (while rank 0 downloads, "
                            "evaluates, writes checkpoints) before the job stops")

        g = parser.add_argument_group("visdom")
        g.add_argument("--display_server", default="http://localhost", help="visdom server")
        g.add_argument("--display_port", type=int, default=8097, help="visdom port")
        g.add_argument("--env", default="main", help="visdom environment")
        g.add_argument("--no_visdom", action="store_true", help="do not send plots to visdom")
        return parser

    def _check_ranges(self, opt: argparse.Namespace) -> None:
        super()._check_ranges(opt)
        need = _need
        need(opt.batch_size >= 1, f"--batch_size must be a positive integer, got {opt.batch_size}")
        need(opt.train_samples >= 1, f"--train_samples must be a positive integer, got {opt.train_samples}")
        need(1 <= opt.display_port <= 65535, f"--display_port must be in 1..65535, got {opt.display_port}")
        need(opt.n is None or opt.n >= 1, f"--n must be a positive integer, got {opt.n}")
        need(0 < opt.dist_timeout <= 1e8, f"--dist_timeout must be a positive number of seconds (at most 1e8), "
             f"got {opt.dist_timeout}")
        train_size = DATASETS[opt.dataset].train_size
        need(opt.subset is None or 1 <= opt.subset <= train_size,
             f"--subset must be between 1 and {train_size} (the {opt.dataset} training-set size), "
             f"got {opt.subset}")
        if opt.epoch <= 0:
            raise UserError(f"--epoch (number of epochs to train) must be a positive integer, got {opt.epoch}")
        if not opt.lr_decay > 0:
            raise UserError(f"--lr_decay must be > 0, got {opt.lr_decay}")
        if opt.lr_step < 1:
            raise UserError(f"--lr_step must be a positive integer, got {opt.lr_step}")
        if opt.log_interval < 1:
            raise UserError(f"--log_interval must be a positive integer, got {opt.log_interval}")
        if opt.augment and opt.dataset != "CIFAR10":
            raise UserError(f"--augment is only supported for CIFAR10, not {opt.dataset}; drop --augment")

    def _check_consistency(self, opt: argparse.Namespace) -> None:
        super()._check_consistency(opt)
        _check_optimizer_flags(opt)

    def resolve(self, opt: argparse.Namespace, explicit: set[str]) -> None:
        """Derived defaults plus ``name``/``run_dir``; checks ``--resume`` has something to resume."""
        super().resolve(opt, explicit)
        if opt.data_root is None:  # recorded as found, so test.py finds the data where training did
            opt.data_root = str(resolve_data_root(None, opt.dataset))
        # absolute, so test.py run from another folder still finds it
        opt.data_root = str(Path(opt.data_root).absolute())
        if opt.name is None:
            opt.name = f"{opt.dataset}_{opt.model}_{opt.optimizer}_{opt.arch}"
        run_dir = Path(opt.ckpt_dir) / opt.name
        opt.run_dir = str(run_dir)
        # rank 0 reads the checkpoint and sends it to the other ranks, whose machines need not see the run folder
        if opt.resume and latest_epoch(run_dir) is None and os.environ.get("RANK", "0") == "0":
            raise UserError(
                f"--resume: no checkpoints in {run_dir}; drop --resume to start a new run, "
                "or pass the --name of the run to continue"
            )


class TestOptions(BaseOptions):
    """Flags of test.py."""

    is_train = False

    def initialize(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add the shared flags plus the evaluation flags."""
        parser = super().initialize(parser)
        g = parser.add_argument_group("evaluation")
        g.add_argument("--epoch", type=int, default=None, help="checkpoint epoch to load (default: latest)")
        g.add_argument("--batch_size", type=int, dest="eval_batch_size", default=None,
                       help="the same as --eval_batch_size")
        g.add_argument("--ood_dataset", choices=tuple(DATASETS), default=None,
                       help="also score out-of-distribution detection against this data set (its test split, "
                            "normalised as the training set is)")
        g.add_argument("--rotate", type=float, default=0.0, metavar="DEG",
                       help="rotate the test images by DEG degrees first (a shifted test set; the OOD set is "
                            "not rotated)")
        return parser

    def gather_options(self, argv: list[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
        """As for train.py, but a training flag is one line saying test.py takes it from the run."""
        args = sys.argv[1:] if argv is None else list(argv)
        # test.py shows neither a dashboard nor a progress bar: these two hold as given (scripts pass them to both)
        args = [a for a in args if a not in ("--no_visdom", "--no_progress")]
        test_flags = {s for a in self.build_parser()._actions for s in a.option_strings}
        train_flags = {s for a in TrainOptions().build_parser()._actions for s in a.option_strings}
        for arg in args:
            flag = arg.split("=", 1)[0]
            if flag in train_flags and flag not in test_flags:
                self.parser = self.build_parser()
                self.parser.error(f"{flag} is a training option; test.py uses the run's value (from its opt.json), "
                                  f"so drop {flag}")
        return super().gather_options(args)

    def _check_ranges(self, opt: argparse.Namespace) -> None:
        super()._check_ranges(opt)
        if opt.epoch is not None and opt.epoch <= 0:
            raise UserError(f"--epoch must be a positive integer, got {opt.epoch}")

    def resolve(self, opt: argparse.Namespace, explicit: set[str]) -> None:
        """Find the run and epoch, take the model-defining options from its opt.json."""
        ckpt_dir = Path(opt.ckpt_dir)
        if opt.name is None:
            run_dir = latest_run(ckpt_dir, opt.model if "model" in explicit else None).path
            opt.name = run_dir.name
        else:
            run_dir = ckpt_dir / opt.name
            if not list_epochs(run_dir):
                runs = ", ".join(r.name for r in list_runs(ckpt_dir)) or "none"
                raise UserError(
                    f"no checkpoints for run {opt.name!r} in {ckpt_dir} (runs with checkpoints: {runs}); "
                    "pass one of them with --name"
                )
        opt.run_dir = str(run_dir)
        saved = RunDir(run_dir).read_options()
        if saved is not None:
            for key in run_keys() + _INHERITED_AT_TEST:
                if key not in saved:
                    continue
                if key in explicit:
                    if key in _FIXED_AT_TEST and saved[key] != getattr(opt, key):
                        raise UserError(
                            f"run {opt.name!r} was trained with --{key} {_fmt(saved[key])}, not "
                            f"{_fmt(getattr(opt, key))}; drop --{key}"
                            + (" (use --ood_dataset for another data set)" if key == "dataset" else "")
                        )
                    continue
                setattr(opt, key, saved[key])
        super().resolve(opt, explicit)
        epochs = list_epochs(run_dir)
        if opt.epoch is None:
            opt.epoch = epochs[-1]
        elif opt.epoch not in epochs:
            raise UserError(
                f"run {opt.name!r} has no checkpoint for epoch {opt.epoch}; available: "
                f"{', '.join(map(str, epochs))}; pass one of them with --epoch, or omit --epoch for the latest"
            )
        if opt.ood_dataset is not None:
            ood, ind = DATASETS[opt.ood_dataset], DATASETS[opt.dataset]
            if opt.ood_dataset == opt.dataset:
                raise UserError(f"--ood_dataset must differ from the run's data set {opt.dataset}")
            if ood.shape != ind.shape:
                fits = [n for n, i in DATASETS.items() if i.shape == ind.shape and n != opt.dataset]
                raise UserError(
                    f"--ood_dataset {opt.ood_dataset} has {'x'.join(map(str, ood.shape))} inputs but the "
                    f"model takes {opt.dataset}'s {'x'.join(map(str, ind.shape))}; choose "
                    + (" or ".join(fits) if fits else "another data set")
                )


def _fmt(value: object) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


# ---------------------------------------------------------------------------
# printing and saving


def format_options(opt: argparse.Namespace) -> str:
    """The options as the seed's human-readable table; a flag given on the command line shows its default."""
    cls = TrainOptions if getattr(opt, "is_train", True) else TestOptions
    parser = cls().build_parser()
    defaults = {a.dest: a.default for a in parser._actions}
    if getattr(opt, "optimizer", None) in OPTIMIZERS:
        defaults.update({k: v for k, v in OPTIMIZERS[opt.optimizer].defaults().items() if k in defaults})
    explicit = set(getattr(opt, "explicit", ()))
    lines = ["----------------- Options ---------------"]
    for k, v in sorted(vars(opt).items()):
        comment = ""
        if k in explicit and k in defaults and v != defaults[k]:
            comment = f"\t[default: {defaults[k]}]"
        lines.append(f"{k:>25}: {str(v):<30}{comment}")
    lines.append("----------------- End -------------------")
    return "\n".join(lines)


def print_options(opt: argparse.Namespace) -> None:
    """Print :func:`format_options` to stdout."""
    print(format_options(opt))


def save_options(opt: argparse.Namespace, run_dir: str | Path) -> None:
    """Write ``opt.txt`` (the table) and ``opt.json`` into ``run_dir`` atomically."""
    RunDir(run_dir).save_options(vars(opt), format_options(opt))
