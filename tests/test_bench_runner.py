"""The bench's runner (``bench/runner.py``): IVON through ``train_epoch`` is IVON's own loop, bit for bit; its
predictive draws the same networks for every set and leaves the global RNG alone; the result store reads the older
flat layout and a study skips what it holds; the one mean ± sd formatter; a generated report regenerates unchanged
from its committed results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import require_module

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import runner  # noqa: E402

from data import InMemoryLoader  # noqa: E402
from experiment import make_model  # noqa: E402


def _data(n: int = 240) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _ivon_run(seed: int = 3) -> runner.Run:
    opt = runner.options(runner.TASKS["mnist_mlp"], runner.METHODS["IVON"], seed, "--hidden", "16")
    return runner.Run(opt, runner.METHODS["IVON"], _data(), ivon_lr=0.1)


def test_ivon_through_train_epoch_is_ivons_own_loop() -> None:
    ivon = require_module("ivon")
    run = _ivon_run()
    assert run.train(2) is None

    opt, (x, y) = run.opt, _data()  # the loop of the ivon package's README, seeded as train.py seeds
    loader = InMemoryLoader(x, y, opt.batch_size, shuffle=True, seed=opt.seed)
    torch.manual_seed(opt.seed)
    model = make_model(opt)
    optimizer = ivon.IVON(model.parameters(), lr=0.1, ess=x.shape[0])
    torch.manual_seed(opt.seed)
    for epoch in (1, 2):
        model.train()
        loader.set_epoch(epoch)
        for xb, yb in loader:
            optimizer.zero_grad()
            with optimizer.sampled_params(train=True):
                F.cross_entropy(model(xb), yb).backward()
            optimizer.step()

    for p, q in zip(run.model.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
    ours, theirs = run.optimizer.ivon.param_groups[0], optimizer.param_groups[0]
    assert torch.equal(ours["hess"], theirs["hess"]) and torch.equal(ours["momentum"], theirs["momentum"])


def test_ivon_predictive_same_networks_for_every_set() -> None:
    require_module("ivon")
    run = _ivon_run()
    assert run.train(1) is None
    images = _data(100)[0]
    state = torch.get_rng_state()
    probs = run.predict(images, 4, epoch=1)
    assert torch.equal(torch.get_rng_state(), state)  # the draws come from their own seeds
    assert torch.allclose(run.predict(images[:40], 4, epoch=1), probs[:40], atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(100, dtype=probs.dtype), atol=1e-5)
    assert not torch.allclose(run.predict(images, 4, epoch=2), probs)  # another epoch, other networks
    mean = run.predict(images, 0, epoch=1)  # the means alone: no draw
    assert torch.equal(mean, run.predict(images, 0, epoch=5))


def test_store_reads_the_flat_layout_and_a_study_skips_what_it_holds(tmp_path: Path) -> None:
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"a|seed=0": {"x": 1.0}}, indent=2))  # the command-line studies' older files
    store = runner.Store(path, commands=[])
    assert store.runs == {"a|seed=0": {"x": 1.0}} and store["commands"] == []

    calls = []

    def one(task: None, name: str, seed: int) -> dict:
        calls.append((name, seed))
        return {"x": float(seed)}

    runner.Study([None], ["a", "b"], [0, 1]).run(store, lambda task, name, seed: f"{name}|seed={seed}", one)
    assert calls == [("b", 0), ("a", 1), ("b", 1)]  # seeds outer; the stored run is not run again
    saved = json.loads(path.read_text())
    assert set(saved) == {"runs", "commands"} and saved["runs"]["a|seed=0"] == {"x": 1.0}
    assert len(saved["runs"]) == 4

    calls.clear()  # a stored run that is not done (e.g. other settings) is run again
    runner.Study([None], ["a"], [0]).run(store, lambda task, name, seed: f"{name}|seed={seed}", one,
                                         done=lambda run, task, name, seed: run["x"] == 0.0)
    assert calls == [("a", 0)] and runner.Store(path).runs["a|seed=0"] == {"x": 0.0}


@pytest.mark.parametrize(("values", "kwargs", "expected"), [
    ([0.5, 0.7], dict(fmt=".2f", scale=100), "60.00 ± 14.14"),
    ([0.5, None, float("nan")], dict(fmt=".3f"), "0.500"),
    ([0.5], dict(fmt=".3f", zero_sd=True), "0.500 ± 0.000"),
    ([], dict(fmt=".3f"), "n/a"),
    ([None], dict(fmt=".3f", missing="-"), "-"),
])
def test_mean_sd(values: list, kwargs: dict, expected: str) -> None:
    assert runner.mean_sd(values, **kwargs) == expected


def test_md_table() -> None:
    assert runner.md_table(["a", "b"], [[1, ""], ["x", 2.5]]) == ["| a | b |", "| --- | --- |", "| 1 |  |",
                                                                  "| x | 2.5 |"]


def test_tridiagonal_report_regenerates_the_committed_one() -> None:
    """``docs/results_tridiagonal.md`` is what ``bench/tridiagonal.py --report_only`` writes from the committed
    results (a report edited by hand, or results committed without it, fail)."""
    import tridiagonal

    text = tridiagonal.report(runner.Store(REPO / "bench" / "results" / "tridiagonal.json"))
    assert text + "\n" == (REPO / "docs" / "results_tridiagonal.md").read_text()


def test_ood_images_use_the_training_sets_normalisation(data_root: Path) -> None:
    """The bench scores an OOD set as ``test.py --ood_dataset`` does: its raw images through the training set's
    mean and std, not its own (checked against a hand normalisation of the raw pixels)."""
    from data.datasets import DATASETS, _load_raw, find_data

    task = runner.TASKS["mnist_mlp"]  # OOD: FashionMNIST, seen through MNIST's normalisation
    ood = runner.Data(data_root).ood_images(task)
    raw, _ = _load_raw(task.ood, find_data(task.ood, data_root), False)
    mean, std = DATASETS[task.dataset].mean, DATASETS[task.dataset].std
    expected = (raw.float() / 255 - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    torch.testing.assert_close(ood, expected)


def test_a_finished_run_is_reused_only_with_the_same_options(tmp_path: Path) -> None:
    """``run_commands`` skips training when the run's checkpoint is there and its options are the command's: a
    stored run at other flags, or without the epoch's checkpoint, is trained again."""
    from option_parser import TrainOptions

    argv = ["--model=FFG", "--lr=1e-3", "--epoch=3", "--no_visdom", "--ckpt_dir", str(tmp_path), "--name", "r"]
    run = tmp_path / "r"
    run.mkdir()
    opt = vars(TrainOptions().parse(argv + ["--device", "cpu"]))
    (run / "opt.json").write_text(json.dumps({**opt, "name": "elsewhere", "ckpt_dir": "/elsewhere"}))
    assert not runner._finished(run, argv + ["--device", "cpu"], 2)  # no checkpoint yet
    (run / "epoch_2.pt").write_bytes(b"")
    assert runner._finished(run, argv + ["--device", "cpu"], 2)  # an earlier epoch of a longer run
    assert not runner._finished(run, [*argv, "--beta2", "0.999", "--device", "cpu"], 2)
