"""Pieces shared by the visdom tests: free loopback ports, saved envs, stopping subprocesses."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
