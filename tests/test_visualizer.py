"""Fast tests of util.visualizer (and tools.visdom_server's helpers).

The servers started here are real visdom servers on free loopback ports,
started without the web assets (the API does not need them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import visdom  # noqa: F401  (imported up front so timings below measure the network only)
from visdom_helpers import VisdomServer, free_port

from tools import visdom_server
from util.visualizer import Visualizer, _series, spectrum_grid, std_histograms
from util.visualizer import main as replay_main

ROOT = Path(__file__).resolve().parents[1]

ITER = {"kind": "iter", "epoch": 1, "iteration": 300, "epoch_float": 0.5, "loss": 0.31, "acc": 0.91, "lr": 0.001}
EPOCH = {
    "kind": "epoch",
    "epoch": 1,
    "iteration": 600,
    "train_loss": 0.3,
    "train_acc": 0.9,
    "test_acc": 0.89,
    "test_nll": 0.35,
    "test_ece": 0.02,
    "lr": 0.001,
    "sec_per_epoch": 4.2,
    "optimizer": "noisy-kfac",  # non-numeric: ignored
    "diverged": False,  # bool: ignored
    "kl": float("nan"),  # not finite: ignored
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VisdomServer]:
    srv = VisdomServer(tmp_path_factory.mktemp("visdom")).wait_or_fail(60)
    yield srv
    srv.stop()


def traces(env_json: dict, win: str) -> dict[str, int]:
    """Trace name -> number of points of window ``win``."""
    return {t["name"]: len(t["x"]) for t in env_json["jsons"][win]["content"]["data"]}


# --- record -> series mapping ---------------------------------------------------------


def test_series_of_iter_record() -> None:
    points = {(win, trace): (x, y) for win, trace, x, y, _ in _series(ITER, "runA")}
    assert points == {
        ("iter_loss", "runA"): (0.5, 0.31),
        ("iter_acc", "runA"): (0.5, 0.91),
        ("iter_lr", "runA"): (0.5, 0.001),
    }
    titles = {win: opts["title"] for win, _, _, _, opts in _series(ITER, "runA")}
    assert titles["iter_loss"] == "train loss (per interval)"


def test_series_of_epoch_record_plots_every_finite_number() -> None:
    series = _series(EPOCH, "runA")
    wins = {(win, trace) for win, trace, *_ in series}
    assert wins == {
        ("train_loss", "runA"),
        ("epoch_accuracy", "runA (train)"),
        ("epoch_accuracy", "runA (test)"),
        ("test_nll", "runA"),
        ("test_ece", "runA"),
        ("lr", "runA"),
        ("sec_per_epoch", "runA"),
    }
    assert all(x == 1.0 for _, _, x, _, _ in series)
    assert all(opts["xlabel"] == "epoch" and opts["title"] for *_, opts in series)


# --- posterior summaries ------------------------------------------------------------------


def test_std_histograms_share_log_bins_and_count_fractions_per_layer() -> None:
    one = np.full(7, 1e-2)  # one value: a single bin holding the whole layer
    two = np.array([1e-3] * 3 + [1e-1] * 3)  # the extremes of the common range, half each
    x, z = std_histograms([one, two], bins=4)
    # bins over log10 std in [-3, -1]: edges -3, -2.5, -2, -1.5, -1
    assert np.allclose(x, [-2.75, -2.25, -1.75, -1.25])
    assert np.allclose(np.nan_to_num(z[0]), [0, 0, 1, 0])  # -2 falls in [-2, -1.5)
    assert np.allclose(np.nan_to_num(z[1]), [0.5, 0, 0, 0.5])
    assert np.isnan(z[1, 1]) and np.isnan(z[1, 2])  # empty bins are NaN (drawn white)


def test_spectrum_grid_reads_sorted_spectra_at_relative_ranks() -> None:
    r, z = spectrum_grid([np.array([1e-2, 1.0, 1e-1]), np.array([5.0, 4.0, 3.0, 2.0, 1.0])], columns=3)
    assert np.allclose(r, [0, 0.5, 1])
    assert np.allclose(z[0], [0, -1, -2])  # largest first, whatever the input order
    assert np.allclose(z[1], np.log10([5.0, 3.0, 1.0]))  # ranks 0, 2, 4 of 5


# --- no server / server lost -----------------------------------------------------------


def log_everything(vis: Visualizer, n: int = 20) -> None:
    import torch

    vis.log_options({"lr": 0.001, "name": vis.name})
    for i in range(n):
        vis.log_record({**ITER, "iteration": i, "epoch_float": i / n})
        vis.log_record({**EPOCH, "epoch": i})
        vis.log_posterior(i, {"fc1": torch.rand(100)}, {"fc1.A": torch.rand(5)})
    vis.save()


def gives_up_in_one_line(vis: Visualizer, capsys: pytest.CaptureFixture[str], start: float) -> str:
    """Logging everything to a server that is not there: done within 2 s of ``start``, the visualizer disabled,
    nothing on stdout and one line on stderr, returned."""
    log_everything(vis)
    assert time.monotonic() - start < 2.0
    assert not vis.enabled
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_no_server_warns_once_and_never_raises(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nothing listens there
    start = time.monotonic()
    line = gives_up_in_one_line(Visualizer(server="http://127.0.0.1", port=port, env="t", name="r"), capsys, start)
    assert line.startswith(f"warning: no visdom server at http://127.0.0.1:{port} ")
    assert "python -m tools.visdom_server" in line and "metrics.jsonl" in line


def test_disabled_is_silent(capsys: pytest.CaptureFixture[str]) -> None:
    vis = Visualizer(port=free_port(), enabled=False)
    log_everything(vis, n=2)
    assert not vis.enabled
    assert capsys.readouterr() == ("", "")


def test_server_killed_mid_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    srv = VisdomServer(tmp_path).wait_or_fail(60)
    try:
        vis = Visualizer(server="http://127.0.0.1", port=srv.port, env="killed", name="r")
        assert vis.enabled
        for i in range(3):
            vis.log_record({**ITER, "epoch_float": i / 3})
        assert traces(srv.saved_env("killed"), "iter_loss") == {"r": 3}
    finally:
        srv.stop()
    line = gives_up_in_one_line(vis, capsys, time.monotonic())
    assert line.startswith(f"warning: lost the visdom server at http://127.0.0.1:{srv.port}")


def test_hung_server_stalls_at_most_one_timeout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    srv = VisdomServer(tmp_path).wait_or_fail(60)
    try:
        vis = Visualizer(server="http://127.0.0.1", port=srv.port, env="hung", name="r", timeout=1.0)
        assert vis.enabled
        os.kill(srv.proc.pid, signal.SIGSTOP)  # accepts connections, never answers
        start = time.monotonic()
        log_everything(vis, n=5)
        elapsed = time.monotonic() - start
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
        srv.stop()
    assert elapsed < 2.0
    assert not vis.enabled
    assert len(capsys.readouterr().err.splitlines()) == 1


# --- plots on a live server -------------------------------------------------------------


def test_runs_share_windows_with_one_trace_each(server: VisdomServer, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    for name in ("runA", "runB"):
        vis = Visualizer(server="http://127.0.0.1", port=server.port, env="shared", name=name)
        vis.log_options({"name": name, "lr": 0.01})
        for i in range(4):
            vis.log_record({**ITER, "epoch_float": i / 4, "loss": 1.0 / (i + 1)})
        for epoch in (1, 2):
            vis.log_record({**EPOCH, "epoch": epoch})
            stds = {"fc1": torch.rand(300) * 0.1, "fc2": torch.full((10,), 0.05)}
            vis.log_posterior(epoch, stds, {"fc1.A": torch.rand(20), "fc1.G": torch.tensor([])})
        assert vis.enabled
    assert capsys.readouterr() == ("", "")

    env = server.saved_env("shared")
    wins = env["jsons"]
    assert traces(env, "iter_loss") == {"runA": 4, "runB": 4}
    assert traces(env, "epoch_accuracy") == {f"{r} ({s})": 2 for r in ("runA", "runB") for s in ("train", "test")}
    for win in ("train_loss", "test_nll", "test_ece", "lr", "sec_per_epoch"):
        assert traces(env, win) == {"runA": 2, "runB": 2}, win
    # posterior: replaced in place each epoch; the summaries are shared (3 traces per run: band edges, median)
    band = {f"{r} {s}": 2 for r in ("runA", "runB") for s in ("10-90% low", "10-90% high")}
    assert traces(env, "posterior_std") == {"runA": 2, "runB": 2, **band}  # x = the 2 layers
    assert traces(env, "kfac_spectrum") == {r: 1 for r in ("runA", "runB", "runA min-max low", "runA min-max high",
                                                           "runB min-max low", "runB min-max high")}
    for run in ("runA", "runB"):  # one heatmap per run, one row per layer / non-empty factor
        (hist,) = wins[f"posterior_std_hist_{run}"]["content"]["data"]
        assert hist["y"] == ["fc1", "fc2"] and len(hist["z"]) == 2 and len(hist["x"]) == 50
        (spec,) = wins[f"kfac_spectra_{run}"]["content"]["data"]
        assert spec["y"] == ["fc1.A"]  # empty spectrum fc1.G: no row
    assert wins["posterior_std"]["title"] == "posterior std per layer (epoch 2)"
    assert wins["posterior_std_hist_runB"]["title"] == "posterior std histograms: runB (epoch 2)"
    assert wins["kfac_spectrum"]["content"]["layout"]["yaxis"]["type"] == "log"
    assert not any(w.startswith(("posterior_std_fc", "spectrum_")) for w in wins)  # no window per layer
    assert wins["iter_loss"]["title"] == "train loss (per interval)"
    assert wins["options_runA"]["type"] == "text" and "<b>lr</b>" in wins["options_runA"]["content"]


def test_dozens_of_layers_take_four_windows(server: VisdomServer, capsys: pytest.CaptureFixture[str]) -> None:
    """A ResNet-sized model (40 layers, 80 Kronecker factors): still 4 posterior windows per run, one row per layer."""
    import torch

    torch.manual_seed(0)
    layers = [f"layer{i // 6 + 1}.{i % 6}.conv" for i in range(40)]
    stds = {name: torch.exp(torch.randn(200) * 0.3 - 3 + 0.02 * i) for i, name in enumerate(layers)}
    spectra = {f"{name}.{f}": torch.logspace(0, -5, 30) for name in layers for f in "AS"}
    vis = Visualizer(server="http://127.0.0.1", port=server.port, env="deep", name="resnet")
    for epoch in (1, 2):
        vis.log_posterior(epoch, stds, spectra)
    assert vis.enabled and capsys.readouterr() == ("", "")
    wins = server.saved_env("deep")["jsons"]
    assert set(wins) == {"posterior_std", "posterior_std_hist_resnet", "kfac_spectrum", "kfac_spectra_resnet"}
    median = next(t for t in wins["posterior_std"]["content"]["data"] if t["name"] == "resnet")
    assert median["x"] == list(range(40))
    expected = [float(np.median(stds[name].double().numpy())) for name in layers]
    assert np.allclose(median["y"], expected, rtol=1e-6)
    xaxis = wins["posterior_std"]["content"]["layout"]["xaxis"]
    assert xaxis["ticktext"] == layers and xaxis["tickvals"] == list(range(40))  # every layer named
    (hist,) = wins["posterior_std_hist_resnet"]["content"]["data"]
    assert hist["y"] == layers and len(hist["z"]) == 40
    assert all(abs(sum(v for v in row if v is not None) - 1) < 1e-9 for row in hist["z"])
    assert wins["posterior_std_hist_resnet"]["height"] >= 40 * 13  # room for every row label
    (spec,) = wins["kfac_spectra_resnet"]["content"]["data"]
    assert len(spec["y"]) == 80 and np.allclose(spec["z"][0][0], 0) and np.allclose(spec["z"][0][-1], -5)


def test_replay_cli_is_idempotent(server: VisdomServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "myrun"
    run_dir.mkdir()
    records = [{**ITER, "epoch_float": i / 10, "loss": 1 / (i + 1)} for i in range(10)]
    records += [{**EPOCH, "epoch": e} for e in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    (run_dir / "opt.json").write_text(json.dumps({"name": "replayed", "lr": 0.001}))
    argv = [str(run_dir), "--server", "http://127.0.0.1", "--port", str(server.port), "--env", "replay"]
    assert replay_main(argv) == 0
    assert replay_main(argv) == 0  # twice: traces replaced, not doubled
    env = server.saved_env("replay")
    assert traces(env, "iter_loss") == {"replayed": 10}
    assert traces(env, "test_nll") == {"replayed": 3}
    assert "options_replayed" in env["jsons"]
    out, err = capsys.readouterr()
    assert err == "" and "replayed 13 records" in out


def test_replay_cli_without_server_fails_cleanly(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps(ITER) + "\n")
    cmd = [sys.executable, "-m", "util.visualizer", str(tmp_path), "--port", str(free_port())]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("warning: no visdom server")


# --- tools.visdom_server helpers -------------------------------------------------------


def test_server_command_binds_loopback_only_for_loopback_names() -> None:
    cmd = visdom_server.server_command(8097, "127.0.0.1", "/tmp/envs/")
    assert cmd[1:] == ["-m", "visdom.server", "-port", "8097", "--hostname", "127.0.0.1"] + [
        "-env_path",
        "/tmp/envs/",
        "-bind_local",
    ]
    assert "-bind_local" in visdom_server.server_command(8097, "localhost", "/tmp/e/")
    assert "-bind_local" not in visdom_server.server_command(8097, "0.0.0.0", "/tmp/e/")


def test_assets_listed_where_build_py_wants_them(tmp_path: Path) -> None:
    missing = visdom_server.missing_assets(tmp_path)
    assert "fonts/glyphicons-halflings-regular.svg#glyphicons_halflingsregular" in missing
    assert "js/plotly-plotly.min.js" in missing
    assert "js/mathjax/2.7.5/MathJax.js" in missing
    assert "fonts/classnames" in missing
    assert missing[-1] == "version.built"


def _run_server_main(tmp_path: Path, path_env: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys, pathlib; from tools import visdom_server as v;"
        f"v.visdom_static_dir = lambda: pathlib.Path({str(tmp_path / 'static')!r});"
        "sys.exit(v.main(['--install-only']))"
    )
    env = {**os.environ, "PATH": path_env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_missing_npm_is_one_clear_line(tmp_path: Path) -> None:
    proc = _run_server_main(tmp_path, str(tmp_path / "empty-bin"))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: 'npm' not found on PATH")


def test_npm_failure_is_one_clear_line(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "npm"
    fake.write_text(
        "#!/bin/sh\necho 'npm error code E404' >&2\n"
        'echo "npm error 404 No match found for version 3.1.1" >&2\nexit 1\n'
    )
    fake.chmod(0o755)
    proc = _run_server_main(tmp_path, str(bin_dir))
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("visdom assets: fetching")]
    assert lines == ["error: npm pack jquery@3.1.1 failed: npm error 404 No match found for version 3.1.1"]


# --- the ELBO and the learned prior ----------------------------------------------------------


ELBO_EPOCH = {"kind": "epoch", "epoch": 2, "elbo": -1200.0, "expected_loglik": -200.0, "kl": 1000.0,
              "prior_var": {"fc1": 2e-3, "fc2": 0.04, "bad": float("nan")}}


def test_series_of_elbo_and_learned_prior() -> None:
    points = {(win, trace): (x, y) for win, trace, x, y, _ in _series(ELBO_EPOCH, "runA")}
    assert points == {
        ("elbo", "runA (ELBO)"): (2.0, -1200.0),
        ("elbo", "runA (E log-lik)"): (2.0, -200.0),
        ("elbo", "runA (KL)"): (2.0, 1000.0),
        ("prior_var", "runA fc1"): (2.0, 2e-3),
        ("prior_var", "runA fc2"): (2.0, 0.04),
    }
    opts = {win: o for win, _, _, _, o in _series(ELBO_EPOCH, "runA")}
    assert opts["prior_var"]["ytype"] == "log" and opts["elbo"]["title"].startswith("ELBO")


def test_elbo_and_prior_windows_reach_the_server(server: VisdomServer, capsys: pytest.CaptureFixture[str]) -> None:
    vis = Visualizer(server="http://127.0.0.1", port=server.port, env="elbo", name="runA")
    for epoch in (1, 2):
        vis.log_record({**ELBO_EPOCH, "epoch": epoch})
    assert capsys.readouterr() == ("", "")
    env = server.saved_env("elbo")
    assert traces(env, "elbo") == {"runA (ELBO)": 2, "runA (E log-lik)": 2, "runA (KL)": 2}
    assert traces(env, "prior_var") == {"runA fc1": 2, "runA fc2": 2}
