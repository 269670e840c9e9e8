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
import math
import sys
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from util.run_dir import RunDir

SKIP_KEYS = frozenset({"kind", "epoch", "iteration", "epoch_float"})
ACCURACY_KEYS = {"train_acc": "train", "test_acc": "test"}
#: the ELBO and its two terms share one window
ELBO_KEYS = {"elbo": "ELBO", "expected_loglik": "E log-lik", "kl": "KL"}
#: a record's per-layer learned prior variances (a mapping layer -> eta): one window, a trace per layer
PRIOR_VAR_KEY = "prior_var"
HIST_BINS = 50
SPECTRUM_COLUMNS = 64
#: plotly's default trace colours (RGB)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
START_HINT = "python -m tools.visdom_server"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _to_numpy(values: Any) -> np.ndarray:
    """Flat float64 array from a tensor, array or sequence."""
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch here
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64).ravel()


def _positive(values: Any) -> np.ndarray:
    """The finite, positive entries of ``values`` as a flat float64 array."""
    v = _to_numpy(values)
    return v[np.isfinite(v) & (v > 0)]


def std_histograms(stds: list[np.ndarray], bins: int = HIST_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Histograms of log10(std) of each layer over common bins spanning all layers.

    Returns the bin centres (log10 std) and a (layers, bins) array of the fraction of each layer's
    weights per bin, NaN where a bin is empty.
    """
    logs = [np.log10(s) for s in stds]
    lo = min(float(v.min()) for v in logs)
    hi = max(float(v.max()) for v in logs)
    if hi - lo < 1e-3:  # all equal: a narrow range around the value
        lo, hi = lo - 0.05, hi + 0.05
    edges = np.linspace(lo, hi, bins + 1)
    z = np.stack([np.histogram(v, bins=edges)[0] / v.size for v in logs])
    z[z == 0] = np.nan
    return (edges[:-1] + edges[1:]) / 2, z


def spectrum_grid(spectra: list[np.ndarray], columns: int = SPECTRUM_COLUMNS) -> tuple[np.ndarray, np.ndarray]:
    """Each spectrum, sorted in decreasing order, read at ``columns`` relative ranks in [0, 1].

    Factors of different sizes become rows of equal length: column j holds the eigenvalue of rank
    round(r_j (K - 1)) of a K-eigenvalue factor, r_j = j / (columns - 1). Returns r and log10 eigenvalues.
    """
    r = np.linspace(0.0, 1.0, columns)
    z = np.empty((len(spectra), columns))
    for i, eig in enumerate(spectra):
        eig = np.sort(eig)[::-1]
        z[i] = np.log10(eig[np.rint(r * (eig.size - 1)).astype(int)])
    return r, z


def _colour(name: str, alpha: float = 1.0) -> str:
    """A stable colour per run name (plotly's default palette), so a run's band matches its line."""
    r, g, b = PALETTE[zlib.crc32(name.encode()) % len(PALETTE)]
    return f"rgba({r}, {g}, {b}, {alpha})"


def _band(run: str, names: list[str], lo: np.ndarray, mid: np.ndarray, hi: np.ndarray, what: str) -> list[dict]:
    """Three traces of one run: the band's lower edge, its upper edge (filled down to the lower), the median.

    x is the layer's index (visdom replaces numeric x only); the axis labels it with ``names``.
    """
    x = list(range(len(names)))
    edge = {"type": "scatter", "mode": "lines", "x": x, "line": {"width": 0, "color": _colour(run)},
            "hoverinfo": "skip", "showlegend": False, "legendgroup": run}  # the legend entry toggles all three
    return [
        {**edge, "name": f"{run} {what} low", "y": lo.tolist()},
        {**edge, "name": f"{run} {what} high", "y": hi.tolist(), "fill": "tonexty", "fillcolor": _colour(run, 0.2)},
        {"type": "scatter", "mode": "lines+markers", "name": run, "x": x, "y": mid.tolist(), "legendgroup": run,
         "line": {"color": _colour(run)}, "marker": {"size": 5, "color": _colour(run)}, "text": names,
         "hovertemplate": f"{html.escape(run)}<br>%{{text}}: %{{y:.3g}}<extra></extra>"},
    ]


def _height(rows: int) -> int:
    """Window height (px) that gives each of ``rows`` category labels room."""
    return int(min(1600, max(350, 150 + 13 * rows)))


def _log_ticks(lo: float, hi: float) -> dict:
    """Tick values and labels of a log axis over [lo, hi]: decades over more than 3 decades, 1-2-5 steps
    over more than a factor 5, else 5 geometrically spaced ticks."""
    decades = math.log10(hi / lo)
    if decades > math.log10(5):
        k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        steps = (1,) if decades > 3 else (1, 2, 5)
        ticks = [m * 10.0**k for k in range(k0, k1 + 1) for m in steps]
    else:  # enough significant digits to tell the ticks apart
        digits = min(8, max(3, 2 + math.ceil(-math.log10(max(hi / lo - 1, 1e-8)))))
        ticks = sorted({float(f"{v:.{digits}g}") for v in np.geomspace(lo, hi, 5)})
    return {"tickvals": ticks, "ticktext": [f"{v:g}" for v in ticks]}


def _width(categories: int) -> int:
    """Window width (px) that gives each of ``categories`` x labels room."""
    return int(min(1200, max(400, 200 + 16 * categories)))


def _layout(xlabel: str, ylabel: str, names: list[str], log_y: bool = False, rows_on_y: bool = False,
            y_range: tuple[float, float] = (1.0, 10.0)) -> dict:
    """Plotly layout for a plot over many named layers (x = layer index labelled by name, or rows on y)."""
    ticks = {"automargin": True, "tickfont": {"size": 10}}
    if rows_on_y:
        xaxis = {"title": {"text": xlabel}}
        yaxis = {**ticks, "type": "category", "autorange": "reversed", "dtick": 1}  # first on top, every name
    else:
        xaxis = {**ticks, "title": {"text": xlabel}, "tickangle": -60 if len(names) > 6 else 0,
                 "tickvals": list(range(len(names))), "ticktext": names}
        yaxis = {"title": {"text": ylabel}, "type": "log" if log_y else "linear"}
        if log_y:  # plain numbers (plotly labels minor log ticks with bare digits)
            yaxis.update(_log_ticks(*y_range))
    return {"xaxis": xaxis, "yaxis": yaxis, "showlegend": not rows_on_y, "hovermode": "closest",
            "margin": {"l": 60, "r": 30, "t": 50, "b": 40}}


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
        if key == PRIOR_VAR_KEY and isinstance(y, Mapping):
            opts = {"title": "prior variance (learned)", "xlabel": "epoch", "ylabel": "eta", "showlegend": True,
                    "markers": True, "markersize": 6, "ytype": "log"}
            points += [(PRIOR_VAR_KEY, f"{name} {layer}", float(x), float(v), opts)
                       for layer, v in y.items() if _is_number(v) and v > 0]
            continue
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
        elif kind == "epoch" and key in ELBO_KEYS:
            win, title, label = "elbo", "ELBO = E log-lik - lambda KL", "nats"
            trace = f"{name} ({ELBO_KEYS[key]})"
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

    def _figure(self, win: str, traces: list[dict], layout: dict, opts: dict) -> None:
        """Create or replace the whole window ``win`` (one run owns it)."""
        msg = {"data": traces, "win": win, "eid": self.env, "layout": layout, "opts": opts}
        self._call("_send", msg, endpoint="events")

    def _shared_traces(self, win: str, traces: list[dict], layout: dict, opts: dict) -> None:
        """Put this run's ``traces`` into window ``win`` (shared by runs), replacing them by name."""
        exists = self._call("win_exists", win, self.env)
        if self._client is None:
            return
        if not exists:
            self._figure(win, traces, layout, opts)
            return
        # A new name is appended whole; a known one gets its x and y replaced; the axes take this run's ticks.
        for trace in traces:
            if self._client is None:
                return
            msg = {"data": [trace], "win": win, "eid": self.env, "name": trace["name"], "append": False,
                   "opts": {"title": opts["title"]}, "layout": {k: layout[k] for k in ("xaxis", "yaxis")}}
            self._call("_send", msg, endpoint="update")

    def log_posterior(self, epoch: int, stds: Mapping[str, Any], spectra: Mapping[str, Any]) -> None:
        """Posterior stds and K-FAC factor spectra of the latest epoch, in four windows whatever the depth.

        * ``posterior_std`` (shared by the runs of the env): per layer, in model order, the median
          marginal posterior std and a band from its 10th to its 90th percentile; one colour per run.
        * ``posterior_std_hist_<run>``: every layer's histogram of log10 std, one heatmap row per layer
          (colour = fraction of that layer's weights in the bin, so small layers stay visible).
        * ``kfac_spectrum`` (shared): per Kronecker factor, the median eigenvalue and a band from the
          smallest to the largest; ``kfac_spectra_<run>``: each factor's sorted spectrum as a heatmap row
          over relative rank (colour = log10 eigenvalue). Only for Noisy K-FAC (``spectra`` non-empty).

        The window headers name the epoch. stds: layer name -> tensor of the posterior std of every
        weight; spectra: factor name (e.g. "fc1.A") -> eigenvalues.
        """
        std = {k: v for k, v in ((k, _positive(v)) for k, v in stds.items()) if v.size}
        eig = {k: v for k, v in ((k, _positive(v)) for k, v in spectra.items()) if v.size}
        if std and self._client is not None:
            names = list(std)
            lo, mid, hi = (np.array([np.quantile(std[k], q) for k in names]) for q in (0.1, 0.5, 0.9))
            title = f"posterior std per layer (epoch {epoch})"
            layout = _layout("layer", "marginal posterior std", names, log_y=True, y_range=(lo.min(), hi.max()))
            layout["title"] = "posterior std per layer: median, 10-90% band"
            self._shared_traces("posterior_std", _band(self.name, names, lo, mid, hi, "10-90%"), layout,
                                {"title": title, "width": _width(len(names)), "height": 450})
            x, z = std_histograms([std[k] for k in names])
            self._heatmap(f"posterior_std_hist_{self.name}", f"posterior std histograms: {self.name} (epoch {epoch})",
                          names, x, z, "marginal posterior std (log scale)", "fraction of the layer's weights",
                          "%{y}<br>std 10^%{x:.2f}<br>%{z:.1%} of the layer<extra></extra>", log10_x=True)
        if eig and self._client is not None:
            names = list(eig)
            lo, mid, hi = (np.array([f(eig[k]) for k in names]) for f in (np.min, np.median, np.max))
            layout = _layout("Kronecker factor", "eigenvalue", names, log_y=True, y_range=(lo.min(), hi.max()))
            layout["title"] = "K-FAC eigenvalues: median, min-max band"
            self._shared_traces("kfac_spectrum", _band(self.name, names, lo, mid, hi, "min-max"), layout,
                                {"title": f"K-FAC factor eigenvalues (epoch {epoch})", "width": _width(len(names)),
                                 "height": 450})
            x, z = spectrum_grid([eig[k] for k in names])
            self._heatmap(f"kfac_spectra_{self.name}", f"K-FAC spectra: {self.name} (epoch {epoch})",
                          names, x, z, "relative rank (0 = largest eigenvalue)", "eigenvalue (log scale)",
                          "%{y}<br>relative rank %{x:.2f}<br>eigenvalue 10^%{z:.2f}<extra></extra>", log10_z=True)

    def _heatmap(self, win: str, title: str, rows: list[str], x: np.ndarray, z: np.ndarray, xlabel: str,
                 zlabel: str, hover: str, log10_x: bool = False, log10_z: bool = False) -> None:
        """One heatmap row per layer/factor (first on top); empty cells (NaN) left white.

        ``log10_x`` / ``log10_z``: x / z hold log10 values; their ticks are labelled with the values.
        """
        colorbar: dict = {"title": {"text": zlabel, "side": "right"}}
        if log10_z:
            finite = z[np.isfinite(z)]
            decades = np.arange(math.floor(finite.min()), math.ceil(finite.max()) + 1)
            colorbar.update(tickvals=decades.tolist(), ticktext=[f"{10.0**k:g}" for k in decades])
        trace = {
            "type": "heatmap", "x": x.tolist(), "y": rows, "colorscale": "Viridis", "hovertemplate": hover,
            "z": [[float(v) if math.isfinite(v) else None for v in row] for row in z], "colorbar": colorbar,
        }
        layout = _layout(xlabel, "", rows, rows_on_y=True)
        if log10_x:
            ticks = _log_ticks(10.0 ** x.min(), 10.0 ** x.max())
            layout["xaxis"].update(tickvals=np.log10(ticks["tickvals"]).tolist(), ticktext=ticks["ticktext"])
        self._figure(win, [trace], layout, {"title": title, "width": 560, "height": _height(len(rows))})

    def save(self) -> None:
        """Ask the server to save this env to its env_path."""
        self._call("save", [self.env])


def main(argv: list[str] | None = None) -> int:
    """Replay checkpoints/<name>/metrics.jsonl (and opt.json) into visdom."""
    parser = argparse.ArgumentParser(prog="python -m util.visualizer", description="Replay a finished run into visdom.")
    parser.add_argument("run_dir", type=Path, help="checkpoints/<name>")
    parser.add_argument("--server", default="http://localhost")
    parser.add_argument("--port", type=int, default=8097)
    parser.add_argument("--env", default="main")
    parser.add_argument("--name", default=None, help="trace name (default: the run's name)")
    args = parser.parse_args(argv)

    run = RunDir(args.run_dir)
    if not run.metrics_path.is_file():
        print(f"error: {run.metrics_path} not found", file=sys.stderr)
        return 1
    options = run.read_options() or {}
    if not options and (run.path / RunDir.OPTIONS_JSON).is_file():
        print(f"warning: {run.path / RunDir.OPTIONS_JSON} is not JSON, options pane skipped", file=sys.stderr)
    name = args.name or str(options.get("name") or args.run_dir.resolve().name)

    vis = Visualizer(server=args.server, port=args.port, env=args.env, name=name)
    if not vis.enabled:
        return 1
    if options:
        vis.log_options(options)
    records = run.read_metrics(warn=True)
    vis.replay(records)
    vis.save()
    if not vis.enabled:
        return 1
    print(f"replayed {len(records)} records of {name!r} into env {args.env!r} at {vis.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
