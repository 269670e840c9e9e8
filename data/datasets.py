"""Whole-split tensor loading for MNIST, FashionMNIST and CIFAR-10.

Each split is returned as one normalized float32 tensor ``N x C x H x W`` plus
int64 labels, so training can index batches directly instead of going through
a per-item ``Dataset``/PIL pipeline.

Where the data is looked for (``resolve_data_root``): ``--data_root``, then
``$DATA_ROOT``, then ``./data``; the first that holds the data set's files
wins.  The layout is torchvision's:

* ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
* ``<root>/FashionMNIST/raw/...`` (same names)
* ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}`` (python pickles)

Missing files are downloaded with torchvision's own downloader into the first
candidate root; if that fails (offline) a :class:`UserError` names the files
that were expected.  The raw IDX files are read with torchvision's reader (no
per-item PIL conversion); the CIFAR-10 pickles are read here with a restricted
unpickler (torchvision's class would insist on the md5 of the full data set).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from util.errors import UserError, one_line

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "ensure_data",
    "expected_files",
    "find_data",
    "has_data",
    "load_split",
    "resolve_data_root",
    "rotate",
]


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a data set (shapes, sizes, normalization)."""

    in_channels: int
    image_size: int
    num_classes: int
    train_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    test_size: int = 10000

    @property
    def input_size(self) -> int:
        """Flattened input size ``C * H * W``."""
        return self.in_channels * self.image_size * self.image_size

    @property
    def shape(self) -> tuple[int, int, int]:
        """Image shape ``(C, H, W)``."""
        return (self.in_channels, self.image_size, self.image_size)


DATASETS: dict[str, DatasetInfo] = {
    "MNIST": DatasetInfo(1, 28, 10, 60000, (0.1307,), (0.3081,)),
    "FashionMNIST": DatasetInfo(1, 28, 10, 60000, (0.2860,), (0.3530,)),
    "CIFAR10": DatasetInfo(
        3, 32, 10, 50000, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
}

_IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = {
    True: tuple(f"data_batch_{i}" for i in range(1, 6)),
    False: ("test_batch",),
}


def _info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise UserError(
            f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}"
        ) from None


def expected_files(name: str, root: str | os.PathLike, train: bool | None = None) -> list[Path]:
    """Paths of the raw files of ``name`` under ``root`` (both splits if ``train`` is None)."""
    _info(name)
    root = Path(root)
    splits = (True, False) if train is None else (train,)
    if name == "CIFAR10":
        return [root / _CIFAR_DIR / f for s in splits for f in _CIFAR_FILES[s]]
    return [root / name / "raw" / f for s in splits for f in _IDX_FILES[s]]


def has_data(name: str, root: str | os.PathLike) -> bool:
    """Whether ``root`` holds all raw files of data set ``name`` (both splits)."""
    return all(p.is_file() for p in expected_files(name, root))


def _candidates(data_root: str | os.PathLike | None) -> list[Path]:
    out: list[Path] = []
    for c in (data_root, os.environ.get("DATA_ROOT") or None, "data"):
        if c is not None and Path(c) not in out:
            out.append(Path(c))
    return out


def find_data(name: str, data_root: str | os.PathLike | None = None) -> Path | None:
    """First of ``data_root``, ``$DATA_ROOT``, ``./data`` that holds ``name``'s files, else None."""
    for root in _candidates(data_root):
        if has_data(name, root):
            return root
    return None


def resolve_data_root(data_root: str | os.PathLike | None, name: str | None = None) -> Path:
    """The data root to use: ``--data_root``, then ``$DATA_ROOT``, then ``./data``.

    With ``name``, the first candidate that has that data set's files wins.
    Without it, the first candidate that has any known data set.  If none has
    the files, the first candidate (where a download would go).
    """
    names = [name] if name is not None else list(DATASETS)
    for root in _candidates(data_root):
        if any(has_data(n, root) for n in names):
            return root
    return _candidates(data_root)[0]


def _missing_message(name: str, data_root: str | os.PathLike | None, why: str) -> str:
    roots = _candidates(data_root)
    shown = [str(p) for p in expected_files(name, roots[0])]
    others = ", ".join(str(r) for r in roots[1:])
    return (
        f"{name} data not found ({why}); expected the files {', '.join(shown)}"
        + (f" (also looked in: {others})" if others else "")
        + "; download them with network access, or point --data_root (or $DATA_ROOT) "
        "at a folder that has them"
    )


def _last_line(err: BaseException) -> str:
    """The most specific line of a download error (torchvision lists every mirror tried)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[-1] if lines else type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _fetch(name: str, root: Path) -> None:
    """torchvision's downloader: ``name``'s raw files into ``root`` (raises on failure)."""
    import torchvision

    # torchvision prints every failed mirror to stdout; keep our error to one line.
    with contextlib.redirect_stdout(io.StringIO()):
        if name == "CIFAR10":
            from torchvision.datasets.utils import download_and_extract_archive

            cls = torchvision.datasets.CIFAR10
            download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
        else:
            cls = getattr(torchvision.datasets, name)
            cls(root=str(root), train=True, download=True)


def _download(name: str, root: Path) -> None:
    """Download ``name`` into ``root`` atomically (raises on failure).

    The files are fetched into a private temp folder under ``root`` and each is renamed into place
    when all are complete, so :func:`has_data` (all files present) never sees a half-written file,
    even with several processes (ranks, machines sharing the folder) downloading at once.
    """
    print(f"downloading {name} to {root} ...", file=sys.stderr)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".download.{name}.", dir=root))
    try:
        _fetch(name, tmp)
        for src in expected_files(name, tmp):
            dst = root / src.relative_to(tmp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------
# raw readers (uint8 N x C x H x W, int64 labels)


def _read_idx(path: Path) -> torch.Tensor:
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    try:
        return read_sn3_pascalvincent_tensor(str(path), strict=True)
    except Exception as e:  # torchvision raises AssertionError/RuntimeError/ValueError/...
        size = path.stat().st_size if path.exists() else 0
        raise UserError(
            f"data file {path} is corrupted or truncated ({size} bytes; "
            f"{type(e).__name__}: {one_line(e) or 'bad header'}); delete it and download "
            "it again, or point --data_root at a good copy"
        ) from None


def _read_mnist_like(name: str, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision

    info = _info(name)
    cls = getattr(torchvision.datasets, name)
    try:
        # torchvision locates and reads the raw IDX files; we take .data/.targets directly.
        ds = cls(root=str(root), train=train, download=False)
        images, labels = ds.data, ds.targets
    except Exception:
        # Find out which file is bad (reading each one raises a UserError naming it).
        img_path, lab_path = expected_files(name, root, train)
        _read_idx(img_path)
        _read_idx(lab_path)
        raise UserError(
            f"could not read {name} from {img_path.parent}; the files may be corrupted: "
            "delete them and download again, or point --data_root at a good copy"
        ) from None
    img_path, lab_path = expected_files(name, root, train)
    s = info.image_size
    if images.dim() != 3 or tuple(images.shape[1:]) != (s, s) or images.dtype != torch.uint8:
        raise UserError(
            f"data file {img_path} has images of shape {tuple(images.shape)}, "
            f"expected N x {s} x {s} uint8; replace it with the real {name} file"
        )
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise UserError(
            f"data file {lab_path} has {labels.numel()} labels for {images.shape[0]} images "
            f"in {img_path}; the files do not belong together, replace them"
        )
    return images.unsqueeze(1), labels.long()


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only builds the numpy arrays a CIFAR-10 batch contains."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR-10 batch")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="latin1").load()
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"])
        data = data.reshape(-1, 3, 32, 32)
        if labels.shape != (data.shape[0],):
            raise ValueError(f"{labels.size} labels for {data.shape[0]} images")
    except Exception as e:
        raise UserError(
            f"data file {path} is corrupted or not a CIFAR-10 python batch "
            f"({type(e).__name__}: {one_line(e)}); delete {path.parent} and download again, "
            "or point --data_root at a good copy of cifar-10-batches-py"
        ) from None
    return data, labels.astype(np.int64)


def _read_cifar(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [_read_cifar_batch(p) for p in expected_files("CIFAR10", root, train)]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return images, labels


# In-process cache of raw uint8 splits, keyed by the files' identity, so repeated
# loads (tests, train + eval in one process) skip the disk.  Callers always get a
# fresh normalized float tensor, so the cache cannot be mutated from outside.
_RAW_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_RAW_CACHE_MAX = 4


def _file_key(paths: list[Path]) -> tuple:
    out = []
    for p in paths:
        st = p.stat()
        out.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    return tuple(out)


def _load_raw(name: str, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    key = (name, train, _file_key(expected_files(name, root, train)))
    hit = _RAW_CACHE.get(key)
    if hit is not None:
        return hit
    if name == "CIFAR10":
        images, labels = _read_cifar(root, train)
    else:
        images, labels = _read_mnist_like(name, root, train)
    num_classes = _info(name).num_classes
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise UserError(
            f"{name} labels under {root} are outside 0..{num_classes - 1}; "
            "the label file is corrupted, replace it"
        )
    if len(_RAW_CACHE) >= _RAW_CACHE_MAX:
        _RAW_CACHE.pop(next(iter(_RAW_CACHE)))
    _RAW_CACHE[key] = (images, labels)
    return images, labels


def normalize(images: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 ``N x C x H x W`` -> float32 ``(x / 255 - mean) / std`` per channel."""
    info = _info(name)
    std = torch.tensor(info.std, dtype=torch.float64)
    mean = torch.tensor(info.mean, dtype=torch.float64)
    scale = (1.0 / (255.0 * std)).to(torch.float32).view(1, -1, 1, 1).to(images.device)
    shift = (-mean / std).to(torch.float32).view(1, -1, 1, 1).to(images.device)
    # one fused pass: x * scale + shift  ==  (x / 255 - mean) / std
    return torch.addcmul(shift, images.to(torch.float32), scale)


def ensure_data(name: str, data_root: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The root holding ``name``'s files (see :func:`find_data`), downloading them if missing.

    Raises :class:`UserError` if the files are missing and cannot be downloaded.
    """
    _info(name)
    root = find_data(name, data_root)
    if root is None:
        target = _candidates(data_root)[0]
        if not download:
            raise UserError(_missing_message(name, data_root, "download disabled"))
        made = [d for d in (target, target / name, target / name / "raw", target / _CIFAR_DIR) if not d.exists()]
        try:
            _download(name, target)
        except Exception as e:
            for d in reversed(made):  # remove the empty folders a failed download leaves
                try:
                    d.rmdir()
                except OSError:
                    pass
            raise UserError(_missing_message(name, data_root, f"download failed: {_last_line(e)}")) from None
        if not has_data(name, target):
            raise UserError(_missing_message(name, data_root, "download left files missing"))
        root = target
    return root


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Raw ``N x C x H x W`` images rotated by ``degrees`` counter-clockwise about their centre (bilinear,
    zero fill: the black background of MNIST-like images), as float32 in the raw 0..255 scale.

    The shifted test sets of Ovadia et al. (2019), "Can you trust your model's uncertainty?": rotating the raw
    image before normalisation keeps the background at the value the model saw in training.
    """
    from torchvision.transforms.functional import InterpolationMode
    from torchvision.transforms.functional import rotate as tv_rotate

    images = images.to(torch.float32)
    if degrees % 360 == 0:
        return images
    return tv_rotate(images, float(degrees), interpolation=InterpolationMode.BILINEAR, fill=[0.0])


def load_split(
    name: str,
    train: bool,
    data_root: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    download: bool = True,
    rotate_degrees: float = 0.0,
    normalize_as: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a whole split as (float32 ``N x C x H x W`` normalized images, int64 labels) on ``device``.

    ``rotate_degrees``: rotate every raw image first (:func:`rotate`; a shifted test set).
    ``normalize_as``: normalise with that data set's statistics instead of ``name``'s own, as a model
    trained on it sees any input (out-of-distribution sets); its images must have the same channels.

    Raises :class:`UserError` if the files are missing and cannot be downloaded,
    or if a file is truncated/corrupted (naming the file).
    """
    root = ensure_data(name, data_root, download)
    images, labels = _load_raw(name, root, train)
    images = images.to(device)
    if rotate_degrees % 360 != 0:
        images = rotate(images, rotate_degrees)
    return normalize(images, normalize_as or name), labels.to(device)
