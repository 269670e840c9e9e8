"""Data sets as whole in-memory tensors, and a loader that batches them."""

from data.datasets import (
    DATASETS,
    DatasetInfo,
    ensure_data,
    expected_files,
    find_data,
    has_data,
    load_split,
    normalize,
    resolve_data_root,
    rotate,
)
from data.loader import InMemoryLoader, random_crop_flip, take_subset

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "InMemoryLoader",
    "ensure_data",
    "expected_files",
    "find_data",
    "has_data",
    "load_split",
    "normalize",
    "random_crop_flip",
    "resolve_data_root",
    "rotate",
    "take_subset",
]
