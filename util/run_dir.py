"""One run's folder, ``<ckpt_dir>/<name>/``, and everything in it.

* ``epoch_<N>.pt``: checkpoints, written atomically (``util.checkpoint``);
* ``opt.txt`` / ``opt.json``: the run's options, as a table and as JSON;
* ``metrics.jsonl``: one JSON record per line (``{"kind": "iter" | "epoch", "epoch": ..., ...}``);
* ``.<file>.<random>.tmp``: temp files a killed atomic write leaves behind.

:class:`RunDir` is the one place that knows these names and the record format; ``train.py``,
``test.py``, ``util.visualizer``'s replay and ``bench/`` go through it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from util.checkpoint import (
    checkpoint_path,
    latest_epoch,
    list_epochs,
    load_checkpoint,
    remove_stale_temp_files,
    save_atomic,
    write_text_atomic,
)
from util.errors import UserError

__all__ = ["RunDir", "latest_run", "list_runs"]


class RunDir:
    """The folder of one run: checkpoints, options, metrics and temp files."""

    METRICS = "metrics.jsonl"
    OPTIONS_JSON = "opt.json"
    OPTIONS_TXT = "opt.txt"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint(self, epoch: int) -> Path:
        """``epoch_<epoch>.pt``."""
        return checkpoint_path(self.path, epoch)

    def epochs(self) -> list[int]:
        """The epochs with a checkpoint, ascending."""
        return list_epochs(self.path)

    def latest_epoch(self) -> int | None:
        return latest_epoch(self.path)

    def save_checkpoint(self, state: dict, epoch: int) -> None:
        """Write ``epoch_<epoch>.pt`` atomically (the previous file stays intact on failure)."""
        save_atomic(state, self.checkpoint(epoch))

    def load_checkpoint(self, epoch: int) -> dict:
        """Load ``epoch_<epoch>.pt`` onto the CPU (:class:`UserError` if missing or corrupted)."""
        return load_checkpoint(self.checkpoint(epoch), map_location="cpu")

    def last_good(self) -> str:
        """Where a failed run can continue from, for error messages."""
        last = self.latest_epoch()
        return f"the last good checkpoint is {self.checkpoint(last)}" if last else "no checkpoint was written"

    def remove_temp_files(self) -> list[Path]:
        """Delete the temp files of a write that was killed before its rename."""
        return remove_stale_temp_files(self.path)

    # -- options --------------------------------------------------------------------------------
    def save_options(self, options: dict, table: str) -> None:
        """``opt.json`` (``options``) and ``opt.txt`` (``table``), each written atomically."""
        write_text_atomic(self.path / self.OPTIONS_TXT, table + "\n")
        write_text_atomic(self.path / self.OPTIONS_JSON,
                          json.dumps(options, indent=2, sort_keys=True, default=str) + "\n")

    def read_options(self) -> dict | None:
        """The options saved in ``opt.json``, or None if missing or unreadable."""
        try:
            with open(self.path / self.OPTIONS_JSON, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    # -- metrics --------------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    def start_metrics(self) -> None:
        """An empty ``metrics.jsonl`` (a new run)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path.write_text("")

    def append_metrics(self, record: dict) -> None:
        """Append one record; :class:`UserError` (saying how to continue) if the disk refuses."""
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise UserError(f"cannot append to {self.metrics_path} ({e.strerror}); free disk space, then continue "
                            f"with --resume ({self.last_good()})") from None

    def read_metrics(self, warn: bool = False) -> list[dict]:
        """The records of ``metrics.jsonl`` ([] if missing); a line cut by a kill mid-write is skipped."""
        try:
            lines = self.metrics_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        records = []
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                if warn:
                    print(f"warning: {self.metrics_path}:{line_no}: not JSON, skipped", file=sys.stderr)
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def truncate_metrics(self, epoch: int) -> None:
        """Keep the records of epochs ``<= epoch`` (for ``--resume``), rewriting the file atomically."""
        keep = [r for r in self.read_metrics() if r.get("epoch", 0) <= epoch]
        write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in keep))


def list_runs(ckpt_dir: str | os.PathLike) -> list[RunDir]:
    """Run folders under ``ckpt_dir`` that hold at least one checkpoint, newest first.

    "Newest" is the modification time of the run's latest checkpoint file.
    """
    try:
        dirs = [p for p in Path(ckpt_dir).iterdir() if p.is_dir()]
    except OSError:
        return []
    stamped = []
    for d in dirs:
        run = RunDir(d)
        last = run.latest_epoch()
        if last is None:
            continue
        try:
            mtime = run.checkpoint(last).stat().st_mtime_ns
        except OSError:
            continue
        stamped.append((mtime, d.name, run))
    stamped.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [run for _, _, run in stamped]


def latest_run(ckpt_dir: str | os.PathLike, model: str | None = None) -> RunDir:
    """The most recently written run under ``ckpt_dir`` (of ``model``, if given).

    A run qualifies if it has at least one ``epoch_<N>.pt``; with ``model``, its ``opt.json`` must also
    record that model. :class:`UserError` if none does.
    """
    for run in list_runs(ckpt_dir):
        if model is None:
            return run
        opts = run.read_options()
        if opts is not None and opts.get("model") == model:
            return run
    which = f" for --model {model}" if model else ""
    raise UserError(
        f"no run with checkpoints{which} in {ckpt_dir}; train one first "
        f"(python train.py{' --model ' + model if model else ''} ...) or pass --name/--ckpt_dir"
    )
