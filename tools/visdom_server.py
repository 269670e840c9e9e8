"""Run visdom's server offline.

On its first start ``python -m visdom.server`` downloads its JavaScript, CSS
and fonts from CDNs (unpkg, cdn.plot.ly, d3js.org, cdnjs), which fails on a
machine without internet.  Every one of those files is also on the npm
registry, so this module fetches them once with ``npm pack``, puts them where
``visdom/server/build.py`` expects them (``<visdom package>/static/...``) and
writes ``static/version.built`` so visdom never tries to download again.

Usage::

    python -m tools.visdom_server [--port 8097] [--hostname 127.0.0.1]
                                 [--env_path DIR] [--install-only]

Any further arguments are passed on to ``visdom.server`` (e.g.
``-logging_level WARNING``).  A loopback ``--hostname`` (127.0.0.1, localhost,
::1) makes the server listen on 127.0.0.1 only; any other hostname makes it
listen on all interfaces, which is what visdom itself does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_PORT = 8097
DEFAULT_HOSTNAME = "127.0.0.1"
DEFAULT_ENV_PATH = os.path.join(os.path.expanduser("~"), ".visdom")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "ip6-localhost"})
NPM_TIMEOUT_S = 300

# npm package -> version, and for each: file inside the package -> destination
# under visdom's ``static/`` folder.  The destinations (names included) are the
# ones visdom/server/build.py (visdom 0.2.4) downloads to.
NPM_ASSETS: dict[tuple[str, str], dict[str, str]] = {
    ("jquery", "3.1.1"): {"dist/jquery.min.js": "js/jquery.min.js"},
    ("bootstrap", "3.3.7"): {
        "dist/js/bootstrap.min.js": "js/bootstrap.min.js",
        "dist/css/bootstrap.min.css": "css/bootstrap.min.css",
        "dist/fonts/glyphicons-halflings-regular.eot": "fonts/glyphicons-halflings-regular.eot",
        "dist/fonts/glyphicons-halflings-regular.woff2": "fonts/glyphicons-halflings-regular.woff2",
        "dist/fonts/glyphicons-halflings-regular.woff": "fonts/glyphicons-halflings-regular.woff",
        "dist/fonts/glyphicons-halflings-regular.ttf": "fonts/glyphicons-halflings-regular.ttf",
        # build.py keeps the URL fragment in the file name.
        "dist/fonts/glyphicons-halflings-regular.svg": (
            "fonts/glyphicons-halflings-regular.svg#glyphicons_halflingsregular"
        ),
    },
    ("react", "16.2.0"): {"umd/react.production.min.js": "js/react-react.min.js"},
    ("react-dom", "16.2.0"): {"umd/react-dom.production.min.js": "js/react-dom.min.js"},
    ("react-modal", "3.1.10"): {"dist/react-modal.min.js": "js/react-modal.min.js"},
    # cdn.plot.ly/plotly-2.11.1.min.js
    ("plotly.js-dist-min", "2.11.1"): {"plotly.min.js": "js/plotly-plotly.min.js"},
    ("sjcl", "1.0.7"): {"sjcl.js": "js/sjcl.js"},
    ("layout-bin-packer", "1.4.0"): {
        "dist/layout-bin-packer.js.map": "js/layout-bin-packer.js.map",
        "dist/layout-bin-packer.js": "js/layout_bin_packer.js",
    },
    # d3js.org/d3.v3.min.js and d3js.org/d3-selection-multi.v1.js
    ("d3", "3.5.17"): {"d3.min.js": "js/d3.v3.min.js"},
    ("d3-selection-multi", "1.0.1"): {"build/d3-selection-multi.js": "js/d3-selection-multi.v1.js"},
    ("save-svg-as-png", "1.4.17"): {"lib/saveSvgAsPng.js": "js/saveSvgAsPng.js"},
    ("react-resizable", "1.4.6"): {"css/styles.css": "css/react-resizable-styles.css"},
    ("react-grid-layout", "0.16.3"): {"css/styles.css": "css/react-grid-layout-styles.css"},
    # build.py fetches unpkg.com/classnames@2.2.5 (the package's main file) and,
    # as the name has no .js/.css suffix, stores it under fonts/.
    ("classnames", "2.2.5"): {"index.js": "fonts/classnames"},
    # The MathJax subset build.py fetches from cdnjs (the page loads MathJax.js
    # and config/TeX-AMS-MML_HTMLorMML.js; the rest is loaded on demand).
    ("mathjax", "2.7.5"): {
        path: f"js/mathjax/2.7.5/{path}"
        for path in (
            "MathJax.js",
            "config/Safe.js",
            "config/TeX-AMS-MML_HTMLorMML.js",
            "extensions/Safe.js",
            "jax/output/SVG/config.js",
            "jax/output/SVG/jax.js",
            "jax/output/SVG/fonts/TeX/fontdata.js",
            "jax/output/SVG/fonts/TeX/Size1/Regular/Main.js",
        )
    },
}


class AssetError(RuntimeError):
    """The offline assets could not be installed."""


def visdom_static_dir() -> Path:
    """Folder the visdom server serves its static files from."""
    import importlib.util

    spec = importlib.util.find_spec("visdom")
    if spec is None or spec.origin is None:
        raise AssetError("the visdom package is not installed (pip install visdom==0.2.4)")
    return Path(spec.origin).parent / "static"


def visdom_version() -> str:
    """Version string visdom compares with static/version.built."""
    version_file = visdom_static_dir().parent / "VERSION"
    try:
        return version_file.read_text().strip()
    except OSError:
        return "no_version_file"


def missing_assets(static_dir: Path | None = None) -> list[str]:
    """Relative paths (under static/) of the assets not installed yet."""
    static_dir = static_dir or visdom_static_dir()
    missing = [dest for files in NPM_ASSETS.values() for dest in files.values() if not (static_dir / dest).is_file()]
    built = static_dir / "version.built"
    try:
        up_to_date = built.read_text().strip() == visdom_version()
    except OSError:
        up_to_date = False
    if not up_to_date:
        missing.append("version.built")
    return missing


def _npm_error(stderr: str) -> str:
    """The most telling line of npm's error output."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("npm error code", "npm ERR! code")):
            continue
        if line.startswith(("npm error", "npm ERR!")):
            return line
    return lines[-1] if lines else "no output"


def _npm_pack(npm: str, spec: str, dest: Path) -> Path:
    """Download the tarball of ``spec`` (name@version) into ``dest``."""
    cmd = [npm, "pack", "--json", "--silent", "--fetch-retries=1", spec]
    try:
        proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, timeout=NPM_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssetError(f"npm pack {spec} timed out after {NPM_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        raise AssetError(f"npm pack {spec} failed: {_npm_error(proc.stderr)}")
    try:
        filename = json.loads(proc.stdout)[0]["filename"]
    except (ValueError, LookupError, TypeError) as exc:
        raise AssetError(f"npm pack {spec}: unexpected output {proc.stdout[:200]!r}") from exc
    tarball = dest / filename
    if not tarball.is_file():
        raise AssetError(f"npm pack {spec}: {filename} was not written")
    return tarball


def _extract(tarball: Path, files: dict[str, str], static_dir: Path) -> None:
    """Copy ``files`` (package path -> static/ path) out of an npm tarball."""
    wanted = dict(files)
    with tarfile.open(tarball) as tar:
        for member in tar:
            if not member.isfile():
                continue
            # npm tarballs have one top folder, usually "package/".
            inner = member.name.split("/", 1)[-1]
            if inner not in wanted:
                continue
            target = static_dir / wanted.pop(inner)
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:
                continue
            tmp = target.with_name(target.name + ".part")
            with source, open(tmp, "wb") as out:
                shutil.copyfileobj(source, out)
            os.replace(tmp, target)
    if wanted:
        raise AssetError(f"{tarball.name} lacks {', '.join(sorted(wanted))}")


def install_assets(static_dir: Path | None = None, npm: str = "npm", quiet: bool = False) -> bool:
    """Install visdom's JS/CSS/fonts from the npm registry unless present.

    Returns True when something was installed, False when all was there.
    """
    static_dir = static_dir or visdom_static_dir()
    missing = set(missing_assets(static_dir))
    if not missing:
        return False
    npm_path = shutil.which(npm)
    if npm_path is None:
        raise AssetError(
            f"{npm!r} not found on PATH; it is needed once to fetch visdom's JavaScript/CSS "
            "from the npm registry (install Node.js/npm, e.g. apt-get install -y npm)"
        )
    reinstall_all = "version.built" in missing
    try:
        static_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="visdom-assets-") as tmp:
            for (package, version), files in NPM_ASSETS.items():
                if not reinstall_all and not missing.intersection(files.values()):
                    continue
                if not quiet:
                    print(f"visdom assets: fetching {package}@{version}", file=sys.stderr)
                tarball = _npm_pack(npm_path, f"{package}@{version}", Path(tmp))
                _extract(tarball, files, static_dir)
                tarball.unlink()
        # Written last: visdom re-downloads everything when it is absent.
        (static_dir / "version.built").write_text(visdom_version())
    except OSError as exc:
        raise AssetError(f"cannot write visdom's assets under {static_dir}: {exc}") from exc
    return True


def server_command(port: int, hostname: str, env_path: str, extra: list[str] | None = None) -> list[str]:
    """Command line that starts visdom's server.

    visdom's ``--hostname`` only changes the URL it prints (and its
    single-dash spelling ``-hostname`` is parsed as ``-h``); the listening
    address is all interfaces unless ``-bind_local`` is given.
    """
    cmd = [sys.executable, "-m", "visdom.server", "-port", str(port), "--hostname", hostname]
    cmd += ["-env_path", env_path]
    if hostname in LOOPBACK_HOSTS:
        cmd.append("-bind_local")
    return cmd + list(extra or [])


def wait_for_server(url: str, timeout: float = 30.0) -> bool:
    """Poll ``url`` (e.g. http://127.0.0.1:8097) until it answers HTTP 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    return False


def main(argv: list[str] | None = None) -> int:
    """Install the assets if needed, then exec visdom's server."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.visdom_server",
        description="Start visdom's server without internet access (assets come from the npm registry, once).",
        epilog="Other arguments go to visdom.server unchanged, e.g. -logging_level WARNING.",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument(
        "--hostname",
        default=DEFAULT_HOSTNAME,
        help="loopback names (127.0.0.1, localhost) listen on 127.0.0.1 only; anything else listens on all interfaces",
    )
    parser.add_argument("--env_path", default=DEFAULT_ENV_PATH, help="folder visdom saves/loads envs in")
    parser.add_argument("--install-only", action="store_true", help="install the assets and exit")
    args, extra = parser.parse_known_args(argv)

    try:
        installed = install_assets()
    except AssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.install_only:
        state = "installed" if installed else "already present"
        print(f"visdom assets {state} in {visdom_static_dir()}")
        return 0

    env_path = os.path.abspath(args.env_path)
    try:
        os.makedirs(env_path, exist_ok=True)
    except OSError as exc:
        print(f"error: cannot create env_path {env_path}: {exc}", file=sys.stderr)
        return 1
    cmd = server_command(args.port, args.hostname, env_path + os.sep, extra)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
