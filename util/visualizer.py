"""Stream training curves and posterior summaries to a visdom dashboard.

``Visualizer`` never blocks or crashes training: when no visdom server
answers (at start or later) it prints one warning line to stderr and turns
itself off; the run's curves are still in ``metrics.jsonl``.

Replay a finished run into visdom::

    python -m util.visualizer checkpoints/<name> [--server S] [--port P] [--env E]
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

SKIP_KEYS = frozenset({"kind", "epoch", "iteration", "epoch_float"})
ACCURACY_KEYS = {"train_acc": "train", "test_acc": "test"}
HIST_BINS = 50
START_HINT = "python -m util.visdom_server"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _to_numpy(values: Any) -> np.ndarray:
    """Flat float64 array from a tensor, array or sequence."""
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch here
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64).ravel()


def _series(record: Mapping[str, Any], name: str) -> list[tuple[str, str, float, float, dict]]:
    """Points (window id, trace name, x, y, opts) that one metrics record adds."""
    kind = str(record.get("kind", "epoch"))
    if kind == "iter":
        x = record.get("epoch_float", record.get("iteration"))
    else:
        x = record.get("epoch", record.get("iteration"))
    if not _is_number(x):
        return []
    points = []
    for key, y in record.items():
        if key in SKIP_KEYS or not _is_number(y):
            continue
        if kind == "iter":
            win = f"iter_{key}"
            label = f"train {key}" if key in ("loss", "acc") else key
            title = f"{label} (per interval)"
            trace = name
        elif kind == "epoch" and key in ACCURACY_KEYS:
            win, title, label = "epoch_accuracy", "accuracy", "accuracy"
            trace = f"{name} ({ACCURACY_KEYS[key]})"
        else:
            win = key if kind == "epoch" else f"{kind}_{key}"
            title = label = key.replace("_", " ")
            trace = name
        opts = {"title": title, "xlabel": "epoch", "ylabel": label, "showlegend": True}
        if kind != "iter":  # few points per run: show them
            opts.update(markers=True, markersize=6)
        if key == "lr" or key.endswith("_lr"):  # schedules decay by factors
            opts["ytype"] = "log"
        points.append((win, trace, float(x), float(y), opts))
    return points


def _make_client(server: str, port: int, env: str, timeout: float) -> Any:
    """A visdom client that raises instead of printing, with request timeouts."""
    import requests
    import visdom

    class QuietVisdom(visdom.Visdom):
        """visdom.Visdom without logging/printing and with a timeout per request."""

        def __init__(self) -> None:
            self._quiet_session = requests.Session()
            self._timeout = (min(1.0, timeout), timeout)
            # send=False: the base constructor neither posts nor logs (it warns
            # about use_incoming_socket=False); we connect ourselves below.
            super().__init__(
                server=server,
                port=port,
                env=env,
                send=False,
                raise_exceptions=True,
                use_incoming_socket=False,
            )
            self.send = True
            self._send({"eid": env}, endpoint="env/" + env)

        @property
        def session(self) -> requests.Session:
            return self._quiet_session

        def _handle_post(self, url: str, data: Any = None) -> str:
            response = self.session.post(url, data=data or {}, timeout=self._timeout)
            response.raise_for_status()
            return response.text

        def win_exists(self, win: str, env: str | None = None) -> bool | None:
            # The base class prints on connection errors; let them propagate.
            answer = self._win_exists_wrap(win, env)
            return {"true": True, "false": False}.get(answer)

    return QuietVisdom()


class Visualizer:
    """Plots metrics records and posterior summaries of one run in visdom.

    Window ids are stable (one per metric) so that several runs in the same
    env share windows, each run being one trace named after ``name``.
    """

    def __init__(
        self,
        server: str = "http://localhost",
        port: int = 8097,
        env: str = "main",
        name: str = "run",
        enabled: bool = True,
        timeout: float = 2.0,
    ) -> None:
        self.server = server if "://" in server else f"http://{server}"
        self.port = port
        self.env = env
        self.name = name
        self.url = f"{self.server.rstrip('/')}:{port}"
        self._client: Any = None
        if not enabled:
            return
        try:
            self._client = _make_client(self.server, port, env, timeout)
        except ImportError as exc:
            self._warn(f"visdom is not installed ({exc.name}); curves go to metrics.jsonl only")
        except (OSError, ValueError) as exc:  # ConnectionError is an OSError
            self._warn(
                f"no visdom server at {self.url} (start one with: {START_HINT}); "
                f"curves go to metrics.jsonl only{self._reason(exc)}"
            )

    @property
    def enabled(self) -> bool:
        """Whether plots are still being sent."""
        return self._client is not None

    @staticmethod
    def _reason(exc: BaseException) -> str:
        text = str(exc)
        if not text or "Error connecting to Visdom server" in text:
            return ""
        return f" ({text.splitlines()[0][:120]})"

    def _warn(self, message: str) -> None:
        self._client = None
        print(f"warning: {message}", file=sys.stderr, flush=True)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call a client method; on any transport failure warn once and turn off."""
        if self._client is None:
            return None
        try:
            return getattr(self._client, method)(*args, **kwargs)
        except (OSError, ValueError) as exc:
            self._warn(f"lost the visdom server at {self.url}; curves go to metrics.jsonl only{self._reason(exc)}")
            return None

    def _plot(
        self,
        win: str,
        trace: str,
        xs: Iterable[float],
        ys: Iterable[float],
        opts: dict,
        update: str = "append",
    ) -> None:
        """Append to (or replace) the trace ``trace`` of window ``win``."""
        x, y = np.asarray(list(xs), dtype=np.float64), np.asarray(list(ys), dtype=np.float64)
        if x.size == 0:
            return
        if update == "replace":
            exists = self._call("win_exists", win, self.env)
            if self._client is None:
                return
            update = "replace" if exists else None
        self._call("line", Y=y, X=x, win=win, env=self.env, opts=dict(opts), update=update, name=trace)

    def log_options(self, options: Mapping[str, Any]) -> None:
        """Show the run's options in a text pane (one pane per run)."""
        rows = "".join(
            f"<tr><td><b>{html.escape(str(k))}</b></td><td>{html.escape(str(v))}</td></tr>"
            for k, v in sorted(options.items())
        )
        text = f"<table>{rows}</table>"
        self._call(
            "text",
            text,
            win=f"options_{self.name}",
            env=self.env,
            opts={"title": f"options: {self.name}"},
        )

    def log_record(self, record: Mapping[str, Any]) -> None:
        """Plot one metrics.jsonl record (kind "iter" or "epoch")."""
        for win, trace, x, y, opts in _series(record, self.name):
            if self._client is None:
                return
            self._plot(win, trace, [x], [y], opts)

    def replay(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Plot a whole run at once (one request per trace, idempotent)."""
        traces: dict[tuple[str, str], tuple[list[float], list[float], dict]] = {}
        for record in records:
            for win, trace, x, y, opts in _series(record, self.name):
                xs, ys, _ = traces.setdefault((win, trace), ([], [], opts))
                xs.append(x)
                ys.append(y)
        for (win, trace), (xs, ys, opts) in traces.items():
            self._plot(win, trace, xs, ys, opts, update="replace")

    def log_posterior(self, epoch: int, stds: Mapping[str, Any], spectra: Mapping[str, Any]) -> None:
        """Histogram of marginal posterior stds per layer; K-FAC factor spectra.

        Each window shows the latest epoch (one trace per run, replaced in
        place); the window header names that epoch.

        stds: layer name -> tensor of the posterior std of every weight.
        spectra: factor name (e.g. "fc1.A") -> eigenvalues; may be empty.
        """
        for layer, values in stds.items():
            if self._client is None:
                return
            std = _to_numpy(values)
            std = std[np.isfinite(std) & (std > 0)]
            if std.size == 0:
                continue
            lo, hi = float(std.min()), float(std.max())
            if hi <= lo * 1.0001:
                lo, hi = lo / 1.1, hi * 1.1
            edges = np.geomspace(lo, hi, HIST_BINS + 1)
            counts, _ = np.histogram(std, bins=edges)
            centers = np.sqrt(edges[:-1] * edges[1:])
            opts = {
                # Window header (updated in place) with the epoch; plot title fixed.
                "title": f"posterior std: {layer} (epoch {epoch})",
                "layoutopts": {"plotly": {"title": f"posterior std: {layer}"}},
                "xlabel": "marginal posterior std",
                "ylabel": "# weights",
                "xtype": "log" if hi > 10 * lo else "linear",  # log axis only over decades
                "showlegend": True,
            }
            self._plot(f"posterior_std_{layer}", self.name, centers, counts, opts, update="replace")
        for factor, values in spectra.items():
            if self._client is None:
                return
            eig = np.sort(_to_numpy(values))[::-1]
            eig = eig[np.isfinite(eig) & (eig > 0)]
            if eig.size == 0:
                continue
            opts = {
                "title": f"spectrum: {factor} (epoch {epoch})",
                "layoutopts": {"plotly": {"title": f"spectrum: {factor}"}},
                "xlabel": "rank",
                "ylabel": "eigenvalue",
                "ytype": "log",
                "showlegend": True,
            }
            rank = np.arange(1, eig.size + 1)
            self._plot(f"spectrum_{factor}", self.name, rank, eig, opts, update="replace")

    def save(self) -> None:
        """Ask the server to save this env to its env_path."""
        self._call("save", [self.env])


def _read_records(path: Path) -> list[dict]:
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                print(f"warning: {path}:{line_no}: not JSON, skipped", file=sys.stderr)
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    """Replay checkpoints/<name>/metrics.jsonl (and opt.json) into visdom."""
    parser = argparse.ArgumentParser(prog="python -m util.visualizer", description="Replay a finished run into visdom.")
    parser.add_argument("run_dir", type=Path, help="checkpoints/<name>")
    parser.add_argument("--server", default="http://localhost")
    parser.add_argument("--port", type=int, default=8097)
    parser.add_argument("--env", default="main")
    parser.add_argument("--name", default=None, help="trace name (default: the run's name)")
    args = parser.parse_args(argv)

    metrics = args.run_dir / "metrics.jsonl"
    if not metrics.is_file():
        print(f"error: {metrics} not found", file=sys.stderr)
        return 1
    options: dict = {}
    opt_file = args.run_dir / "opt.json"
    if opt_file.is_file():
        try:
            options = json.loads(opt_file.read_text())
        except ValueError:
            print(f"warning: {opt_file} is not JSON, options pane skipped", file=sys.stderr)
    name = args.name or str(options.get("name") or args.run_dir.resolve().name)

    vis = Visualizer(server=args.server, port=args.port, env=args.env, name=name)
    if not vis.enabled:
        return 1
    if options:
        vis.log_options(options)
    records = _read_records(metrics)
    vis.replay(records)
    vis.save()
    if not vis.enabled:
        return 1
    print(f"replayed {len(records)} records of {name!r} into env {args.env!r} at {vis.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
