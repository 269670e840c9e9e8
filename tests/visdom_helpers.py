"""Pieces shared by the visdom tests: free loopback ports, a server subprocess, saved envs, stopping subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import free_port

from tools.visdom_server import wait_for_server


def saved_env(url: str, env_path: Path, env: str, timeout: float = 10) -> dict:
    """Ask the visdom server at ``url`` to save ``env`` and return the JSON it wrote under ``env_path``."""
    import requests

    requests.post(f"{url}/save", data=json.dumps({"data": [env]}), timeout=timeout).raise_for_status()
    return json.loads((env_path / f"{env}.json").read_text())


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def visdom_command(port: int, env_path: Path) -> list[str]:
    """visdom's own server, without the web assets (its API does not need them), on loopback only."""
    return [sys.executable, "-c", "from visdom.server.run_server import main; main()", "-port", str(port),
            "-env_path", f"{env_path}/", "-bind_local", "-logging_level", "WARNING"]


class VisdomServer:
    """A visdom server subprocess on a free loopback port, serving ``folder/envs``, its output in
    ``folder/server.log``; ``command(port, env_path)`` is its command line. Starting returns at once: ``wait`` (or
    ``wait_or_fail``) until it answers; ``ready`` is set once it has."""

    def __init__(self, folder: Path, command: Callable[[int, Path], list[str]] = visdom_command,
                 cwd: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env_path = folder / "envs"
        self.env_path.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / "server.log"
        self.ready = threading.Event()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(command(self.port, self.env_path), cwd=cwd, stdout=log,
                                         stderr=subprocess.STDOUT)

    def wait(self, timeout: float) -> bool:
        """True once the server answers HTTP 200; False if it exits or ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if wait_for_server(self.url, timeout=1.0):
                self.ready.set()
                return True
        return False

    def wait_or_fail(self, timeout: float) -> VisdomServer:
        if not self.wait(timeout):
            self.stop()
            pytest.fail(f"visdom server did not answer within {timeout} s (exit {self.proc.returncode}):\n"
                        f"{self.log_text()}")
        return self

    def log_text(self) -> str:
        return self.log_path.read_text()[-3000:]

    def saved_env(self, env: str) -> dict:
        return saved_env(self.url, self.env_path, env)

    def stop(self) -> None:
        stop_process(self.proc)
