"""The numbers the README, ``--help`` and test.py's output promise, against the code and against each other.

* README's "Flags" table: every default it states is the default ``train.py`` uses (for an optimizer's flag: the
  default of every optimizer that takes it), read from the table itself, so a changed default or a stale table fails.
* README's "Defaults" table: lr, momentum, beta2, prior variance, damping, initial precision and the "other" column
  (Fisher, T_stats, T_inv, KL clip, damping mode, the factors' running-average rate beta, the conv location stride)
  of each optimizer, and the sigma_0 it quotes for the diagonal methods' initial precision.
* ``--help`` shows the default of every flag that has a fixed one; the mappings written into help texts (optimizer by
  model, architecture by data set, the MLP's hidden size) are the ones the parser applies.
* The evaluation protocol: ECE over 15 equal-width bins (README, ``evaluate``), 10 test samples by default (README's
  table, both scripts), the evaluation batch per device (README's Flags table; a speed setting that leaves the
  predictive unchanged).
* Each data set's normalisation constants: mean and std of the training images (MNIST, FashionMNIST: computed here
  from the raw files; CIFAR-10: the published values, and computed when its files are present).
* The default run folder of ``make train``, its epoch count, and ``DENSE_ROOT_MAX`` as the README and MATH.md state
  it.

Each documented value is also written here once (``DOCUMENTED``): a change must touch this file, the docs and the
code together.
"""

from __future__ import annotations

import argparse
import inspect
import re
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from torch import nn

from data.datasets import DATASETS, expected_files, find_data
from evaluation import default_eval_batch_size, evaluate
from models import ARCHS, NORMALIZED_ARCHS, build_model
from optimizers import NoisyAdam, NoisyKFAC
from optimizers.noisy_kfac import DENSE_ROOT_MAX
from optimizers.registry import OPTIMIZERS, default_optimizers, optimizer_defaults, option_names
from option_parser import DEFAULT_ARCH, TrainOptions
from option_parser import TestOptions as _TestOptions  # "Test*" names would be collected by pytest
from util.metrics import ECE_BINS, reliability_bins

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
MATH = (REPO / "docs" / "MATH.md").read_text()

#: what the docs promise; each is also read from the docs below
DOCUMENTED = {
    "ece_bins": 15,
    "test_samples": 10,
    "eval_batch_size": ("64", "4096"),
    "sigma0_diagonal": 0.032,
    "dense_root_max": 256,
    "make_train_epochs": 20,
}
#: mean and std of each training split's pixels in [0, 1] (CIFAR-10 per channel; the widely published values)
NORMALISATION = {
    "MNIST": ((0.1307,), (0.3081,)),
    "FashionMNIST": ((0.2860,), (0.3530,)),
    "CIFAR10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
#: README's "Defaults" table: row name -> --optimizer
DEFAULTS_ROWS = {"Noisy Adam": "noisy_adam", "VOGN": "vogn", "Noisy K-FAC": "noisy_kfac", "Adam (MAP)": "adam"}
#: default cells of README's "Flags" table that name a derived default (the parser fills them in)
DERIVED = {"per optimizer", "by data set", "the real size (or --subset)"}


# -- reading the docs ---------------------------------------------------------------------------------
def markdown_table(text: str, heading: str) -> list[list[str]]:
    """The body rows (cells stripped) of the first table under ``heading`` (a line of the document)."""
    lines = text.splitlines()
    assert heading in lines, f"README has no heading {heading!r}: the test reads its table from there"
    rows, started = [], False
    for line in lines[lines.index(heading) + 1:]:
        if line.startswith("|"):
            started = True
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif started:
            break
    assert len(rows) > 2, f"no table under {heading!r}"
    return rows[2:]  # without the header and the |---| line


def documented(pattern: str, text: str = README, where: str = "README") -> str:
    """The one group of ``pattern`` in ``text`` (a run of whitespace reads as one space); fails if the docs no
    longer say it."""
    m = re.search(pattern, " ".join(text.split()))  # lines joined: a fact may be wrapped
    assert m, f"{where} no longer states {pattern!r}"
    return m.group(1)


def same(doc: str, value: object) -> bool:
    """A documented token (``1e-3``, ``100``, ``point``, ``exact`` for none) against a code value."""
    doc = doc.strip("`")
    if doc == "exact":
        return value is None
    if isinstance(value, bool):
        return doc == str(value).lower()
    try:
        number = float(doc)
    except ValueError:
        return doc == str(value)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) == number


def code_defaults(flag: str) -> dict[str, object]:
    """``train.py``'s default of ``flag``: ``{"": value}``, or per optimizer for the optimizer's options."""
    key = flag.lstrip("-")
    default = TrainOptions().build_parser().get_default(key)
    if key in option_names() and default is None:
        return {name: optimizer_defaults(name)[key] for name in OPTIMIZERS if key in optimizer_defaults(name)}
    return {"": default}


# -- README's "Flags" table ---------------------------------------------------------------------------
def flag_rows() -> list[tuple[list[str], str, str]]:
    """(flags, meaning, default cell) of each row of the Flags table."""
    return [(re.findall(r"`(--\w+)", flags), meaning, default)
            for flags, meaning, default in markdown_table(README, "### Flags")]


def test_flags_table_defaults_are_the_parsers() -> None:
    checked = 0
    for flags, _, cell in flag_rows():
        if flags[0] == "--display_server":  # "localhost:8097": server and port in one cell
            server, port = (code_defaults(f)[""] for f in ("--display_server", "--display_port"))
            assert f"{urlparse(server).hostname}:{port}" == cell, (flags, cell)
            continue
        if flags[0] == "--eval_batch_size":  # per device, derived at parse time: test_eval_batch_size_default
            continue
        for flag, doc in zip(flags, cell.split(", ") if cell else []):  # an empty cell states no default
            values = code_defaults(flag)
            if doc.replace("`", "") in DERIVED:
                assert list(values.values()) in ([None], []) or len(set(map(str, values.values()))) > 1, \
                    f"README's Flags table calls {flag}'s default {doc!r}, but it is {values}"
                continue
            assert values and all(same(doc, v) for v in values.values()), \
                f"README's Flags table gives {flag} the default {doc}; train.py uses {values}"
            checked += 1
    assert checked >= 20, f"only {checked} defaults read from the Flags table: has its layout changed?"


def test_flags_table_derived_defaults_and_examples() -> None:
    meanings = {flags[0]: meaning for flags, meaning, _ in flag_rows()}
    arrows = lambda text: dict(re.findall(r"(\w[\w-]*) ?(?:→|->) ?(\w+)", text))
    assert arrows(meanings["--optimizer"]) == default_optimizers()
    by_data = arrows(meanings["--arch"])
    assert {"MNIST": by_data["MNIST-like"], "FashionMNIST": by_data["MNIST-like"],
            "CIFAR10": by_data["CIFAR10"]} == DEFAULT_ARCH
    hidden = documented(r"`--hidden (\d+)`")  # in the --arch row
    assert TrainOptions().parse(["--device", "cpu"]).hidden == [int(hidden)]
    # "the seed's MVG run: --lr_schedule step --lr_decay 0.1 --lr_step 30": the decay and step are the defaults
    example = dict(re.findall(r"--(lr_decay|lr_step) ([\d.]+)", meanings["--lr_schedule"]))
    assert example and all(same(v, code_defaults(k)[""]) for k, v in example.items()), example


# -- README's "Defaults" table ------------------------------------------------------------------------
def number(text: str) -> float:
    return float(documented(r"^([\d.e+-]+)", text, "a README Defaults cell"))


def test_defaults_table_is_each_optimizers_signature() -> None:
    rows = {r[0]: r[1:] for r in markdown_table(README, "### Defaults")}
    assert set(rows) == set(DEFAULTS_ROWS), f"the Defaults table's rows are {sorted(rows)}"
    for row, name in DEFAULTS_ROWS.items():
        lr, momentum, prior_var, damping, init_precision, other = rows[row]
        code = optimizer_defaults(name)
        doc: dict[str, object] = {"lr": number(lr)}
        if momentum:
            doc["momentum"] = float(documented(r"(?:^|β1 )([\d.]+)", momentum, row))
        if "β2" in momentum:
            doc["beta2"] = float(documented(r"β2 ([\d.]+)", momentum, row))
        for key, cell in (("prior_var", prior_var), ("damping", damping), ("init_precision", init_precision)):
            if cell:
                doc[key] = number(cell)
        if "per-example Fisher" in other:
            doc["fisher"] = "example"
        if name == "noisy_kfac":
            doc.update(t_stats=int(documented(r"T_stats (\d+)", other)), t_inv=int(documented(r"T_inv (\d+)", other)),
                       kl_clip=float(documented(r"KL clip ([\d.e-]+)", other)),
                       damping_mode=documented(r"(\w+) damping", other),
                       kfac_conv_stride=int(documented(r"every (\d+)\w* location", other)))
            beta = float(documented(r"β ([\d.]+)", other))
            assert inspect.signature(NoisyKFAC).parameters["stat_decay"].default == beta, "Kronecker factors' β"
        got = {k: code.get(k) for k in doc}
        assert got == doc, f"README's Defaults table, {row}: {doc}; the class's defaults: {got}"


def test_initial_posterior_std_of_the_diagonal_methods() -> None:
    """``1e3 (σ₀ ≈ 0.032)``: a fresh Noisy Adam at its defaults (N = 60000) samples weights with that std."""
    doc = float(documented(r"1e3 \(σ₀ ≈ ([\d.]+)\)"))
    assert doc == DOCUMENTED["sigma0_diagonal"]
    assert f"`σ₀ = {doc}`" in MATH
    model = build_model("mlp", "FFG", 1, 28, 10, hidden=[100])
    NoisyAdam(model)
    stds = torch.cat([layer.weight_std().flatten() for layer in (model.fc1, model.fc2)])
    assert round(float(stds.median()), 3) == doc and float(stds.max() - stds.min()) < 1e-6


# -- --help -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [TrainOptions, _TestOptions], ids=["train.py", "test.py"])
def test_help_shows_every_fixed_default(options: type) -> None:
    parser = options().build_parser()
    missing = []
    for action in parser._actions:
        if not action.option_strings or action.default in (None, argparse.SUPPRESS) or action.dest == "help":
            continue
        entry = " ".join(parser._get_formatter()._format_action(action).split())  # the flag's lines in --help
        default = ",".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
        if f"(default: {default})" not in entry:
            missing.append(f"{action.option_strings[0]} ({default})")
    assert missing == [], f"--help does not show these defaults: {missing}"


def test_help_texts_state_what_the_parser_does() -> None:
    text = " ".join(TrainOptions().build_parser().format_help().split())
    optimizer = documented(r"default follows --model: ([^-][\w>, -]+?)(?: --|$)", text, "--help")
    assert dict(re.findall(r"(\w+)->(\w+)", optimizer)) == default_optimizers()
    arch = dict(re.findall(r"([\w/]+)->(\w+)", documented(r"default by data set: (\S+ \S+)", text, "--help")))
    assert {d: a for ds, a in arch.items() for d in ds.split("/")} == DEFAULT_ARCH
    assert TrainOptions().parse(["--device", "cpu"]).hidden == [int(documented(r"\(default (\d+); --arch mlp only",
                                                                               text, "--help"))]
    assert "(default: exact factors)" in text and code_defaults("--kfac_rank")["noisy_kfac"] is None


# -- the evaluation protocol --------------------------------------------------------------------------
def numpy_ece(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """Expected calibration error over ``bins`` equal-width confidence bins ``(b/bins, (b+1)/bins]``."""
    conf, correct = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    return sum(abs(correct[sel].sum() - conf[sel].sum()) for lo, hi in zip(edges, edges[1:])
               if (sel := (conf > lo) & (conf <= hi)).any()) / len(labels)


def test_ece_has_the_documented_bin_count() -> None:
    """The ECE that train.py and test.py report (``evaluate``) is the 15-bin one, as README and its docstring say."""
    bins = int(documented(r"ECE \((\d+) bins\)"))
    assert bins == int(documented(r"ECE \((\d+) bins\)", evaluate.__doc__, "evaluate's docstring"))
    assert bins == DOCUMENTED["ece_bins"] == ECE_BINS
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 10, generator=gen, dtype=torch.float64) * torch.rand(4000, 1, generator=gen) * 6
    conf, pred = logits.softmax(1).max(1)
    # right with a probability that swings around the confidence: over- and under-confident bins alternate
    right = torch.rand(4000, generator=gen, dtype=torch.float64) < (0.5 + 0.5 * torch.sin(25 * conf))
    labels = torch.where(right, pred, (pred + 1) % 10)
    metrics, probs = evaluate(nn.Identity(), logits, labels, samples=0)
    p, y = probs.numpy(), labels.numpy()
    matches = [b for b in range(5, 31) if abs(numpy_ece(p, y, b) - metrics["ece"]) < 1e-12]
    assert matches == [bins], f"evaluate's ECE is the {matches}-bin one, the docs say {bins}"
    assert len(reliability_bins(probs, labels)["count"]) == bins  # the reliability diagrams' bins are the ECE's


def test_test_samples_default() -> None:
    """10 weight samples at evaluation, in both scripts (README's Flags table checks the same number)."""
    doc = int(documented(r"\| `--train_samples`, `--test_samples` \|[^|]*\| \d+, (\d+) \|"))
    assert doc == DOCUMENTED["test_samples"] == int(documented(r"`--test_samples` is (\d+) unless given"))
    for options in (TrainOptions, _TestOptions):
        assert options().build_parser().get_default("test_samples") == doc


def test_eval_batch_size_default() -> None:
    """The README's evaluation batch (``cpu 64 per thread, cuda 4096``) is the per-device default, and only a speed
    setting: the predictive does not depend on it (each of the S networks scores every batch)."""
    doc = (documented(r"`--eval_batch_size` \| [^|]* \| cpu (\d+) per thread, cuda \d+ \|"),
           documented(r"`--eval_batch_size` \| [^|]* \| cpu \d+ per thread, cuda (\d+) \|"))
    assert doc == DOCUMENTED["eval_batch_size"]
    per_thread, gpu = map(int, doc)
    for threads in (1, 2, 3):
        assert default_eval_batch_size("cpu", threads) == per_thread * threads
    assert default_eval_batch_size("cuda") == gpu
    torch.manual_seed(0)
    model = build_model("mlp", "FFG", 1, 28, 10, hidden=[8])
    NoisyAdam(model, init_precision=10.0)  # a wide posterior: weight samples matter
    x, y = torch.randn(2 * per_thread + 7, 1, 28, 28), torch.randint(0, 10, (2 * per_thread + 7,))
    results = [evaluate(model, x, y, 2, batch_size=b)[1] for b in (None, per_thread, 1000)]
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[0], results[2], rtol=0, atol=1e-6)


# -- data sets ----------------------------------------------------------------------------------------
def pixel_stats(name: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the training images in [0, 1], read from the raw files here."""
    if name == "CIFAR10":
        import pickle

        data = np.concatenate([pickle.loads(p.read_bytes(), encoding="latin1")["data"]
                               for p in expected_files(name, root, train=True)]).reshape(-1, 3, 1024)
        channels = data.transpose(1, 0, 2).reshape(3, -1)
    else:
        channels = np.fromfile(expected_files(name, root, train=True)[0], dtype=np.uint8)[16:].reshape(1, -1)
    counts = np.stack([np.bincount(c, minlength=256) for c in channels]).astype(np.float64)  # exact, and fast
    values = np.arange(256) / 255.0
    mean = counts @ values / counts.sum(1)
    return mean, np.sqrt(counts @ values**2 / counts.sum(1) - mean**2)


@pytest.mark.parametrize("name", list(NORMALISATION))
def test_normalisation_constants(name: str, data_root: Path) -> None:
    mean, std = NORMALISATION[name]
    assert (DATASETS[name].mean, DATASETS[name].std) == (mean, std)
    root = find_data(name, data_root)
    if root is None:
        assert name == "CIFAR10", f"{name} not found under {data_root}"
        return  # the published values above; computed when the files are present
    got_mean, got_std = pixel_stats(name, root)
    np.testing.assert_allclose(got_mean, mean, atol=5e-5, err_msg=f"{name}: the training images' mean")
    np.testing.assert_allclose(got_std, std, atol=5e-5, err_msg=f"{name}: the training images' std")


# -- runs and other constants the docs state ----------------------------------------------------------
def test_make_train_run_folder_and_epochs() -> None:
    """``make train`` trains the README's ``checkpoints/MNIST_FFG_noisy_adam_mlp/`` for 20 epochs."""
    folder, epochs = re.search(r"make train .*?for (\d+) epochs -> (\S+)/", README).group(2, 1)
    makefile = (REPO / "Makefile").read_text()
    command = re.search(r"\ntrain: setup\n\t.*? train\.py (.*)\n", makefile)
    assert command, "the Makefile's train target no longer runs train.py"
    command = command.group(1)
    opt = TrainOptions().parse(command.split() + ["--device", "cpu"])
    assert int(epochs) == opt.epoch == DOCUMENTED["make_train_epochs"]
    assert folder == str(Path(opt.ckpt_dir) / opt.name) == opt.run_dir


def test_dense_root_max_as_documented() -> None:
    for text, where in ((README, "README"), (MATH, "docs/MATH.md")):
        assert int(documented(r"(\d+) \(`DENSE_ROOT_MAX`\)", text, where)) == DENSE_ROOT_MAX, where
    assert DENSE_ROOT_MAX == DOCUMENTED["dense_root_max"]


def test_normalized_defaults_sentence_is_each_optimizers() -> None:
    """README's sentence on BatchNorm networks states each class's ``normalized_defaults``, and ``train.py`` uses them
    on every architecture of ``models.NORMALIZED_ARCHS`` (and only there)."""
    text = next((" ".join(p.split()) for p in README.split("\n\n") if p.startswith("On a network with BatchNorm")),
                "")
    m = re.search(r"Noisy Adam and VOGN lr ([\d.]+), β2 ([\d.]+), initial precision ([\d.e]+)", text)
    assert m, "README no longer states the diagonal methods' defaults on a BatchNorm network"
    lr, beta2, prec = m.groups()
    for name in ("noisy_adam", "vogn"):
        assert OPTIMIZERS[name].normalized_defaults() == {"lr": float(lr), "beta2": float(beta2),
                                                          "init_precision": float(prec)}
    kl = documented(r"Noisy K-FAC λ \(`--kl_weight`\) ([\d.]+e-\d+)", text)
    assert OPTIMIZERS["noisy_kfac"].normalized_defaults() == {"kl_weight": float(kl)}
    for arch in ARCHS:
        o = TrainOptions().parse(["--arch", arch, "--dataset", "FashionMNIST", "--device", "cpu"])
        normalized = any(isinstance(m, nn.modules.batchnorm._NormBase) for m in build_model(
            arch, "MAP", 1, 28, 10).modules())
        assert (arch in NORMALIZED_ARCHS) == normalized, f"models.NORMALIZED_ARCHS and {arch}'s layers disagree"
        assert o.lr == (float(lr) if normalized else optimizer_defaults("noisy_adam")["lr"]), arch
