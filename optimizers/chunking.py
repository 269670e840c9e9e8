"""Memory of the chunked curvature rules: element bounds on one chunk's buffers, and a pool of reused buffers.

The rules of ``optimizers.curvature_rules`` form per-example products a chunk of the batch at a time, so that
each buffer stays within a bound: on the CPU a few MB, so that it stays in cache; on CUDA a share of the
device's memory, since there a chunk costs kernel launches and gains no cache. Their buffers come from a
per-thread pool (``scratch``) and are reused from one backward pass to the next: a fresh multi-megabyte
temporary is handed back to the OS when freed and page-faulted in again at its next use.
"""

from __future__ import annotations

import functools
import threading
from typing import NamedTuple

import torch
from torch import Tensor

#: bound on the per-example gradient tensor formed for one chunk of a Linear layer on sequences (elements)
_CHUNK_ELEMENTS = 2**23
#: bounds on one chunk of a conv batch (elements): its unfolded input patches (4 MB) and its per-example
#: gradients (2 MB), both in cache with the chunk's inputs
_PATCH_CHUNK_ELEMENTS = 2**20
_GRAD_CHUNK_ELEMENTS = 2**19
#: bound on one chunk of a BatchNorm layer's elementwise products (elements; 1 MB, in cache with its inputs)
_NORM_CHUNK_ELEMENTS = 2**18
#: on a GPU the bounds above would cut a batch into many small chunks, each a few kernel launches, for no cache
#: to gain: there each chunk buffer may take this share of the device's memory instead (on an 80 GB card 625 MB,
#: so ResNet-20's first convolution on a batch of 128 CIFAR images, 75 MB of patches, is one chunk, not 19)
_CUDA_BUFFER_SHARE = 1 / 128


class ChunkLimits(NamedTuple):
    """Element bounds on the chunked rules' buffers (``chunk_limits``)."""

    linear: int  # per-example gradients of a Linear layer on sequences
    patches: int  # a convolution chunk's unfolded input patches
    grads: int  # a convolution chunk's per-example gradients
    norm: int  # a BatchNorm chunk's elementwise products


def chunk_limits(device: torch.device, element_size: int = 4, total_memory: int | None = None) -> ChunkLimits:
    """The chunk bounds for tensors on ``device``: cache-sized on the CPU (and other devices), memory-sized on CUDA.

    ``total_memory``: the CUDA device's memory in bytes (default: what the device reports).
    """
    if device.type != "cuda":
        return ChunkLimits(_CHUNK_ELEMENTS, _PATCH_CHUNK_ELEMENTS, _GRAD_CHUNK_ELEMENTS, _NORM_CHUNK_ELEMENTS)
    if total_memory is None:
        total_memory = _cuda_memory(device)
    n = max(1, int(total_memory * _CUDA_BUFFER_SHARE) // element_size)
    return ChunkLimits(n, n, n, n)


@functools.cache
def _cuda_memory(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).total_memory


def limits_of(x: Tensor) -> ChunkLimits:
    """The chunk bounds for tensors like ``x`` (its device and element size)."""
    return chunk_limits(x.device, x.element_size())


class _Scratch(threading.local):
    """Flat buffers reused by the chunked rules from one backward pass to the next.

    A fresh multi-megabyte temporary is handed back to the OS when freed and page-faulted in again at every
    use, which can cost more than the product written into it. The chunk bounds keep each buffer at a few MB
    (on the CPU); one set per thread, dtype and device.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised tensor of ``shape`` (``like``'s dtype and device) in the buffer ``name``."""
        n = 1
        for d in shape:
            n *= d
        key = (name, like.dtype, like.device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self.buffers[key] = like.new_empty(n)
        return buf[:n].view(shape)


#: the pool the rules take their buffers from
scratch = _Scratch()


def release_scratch() -> None:
    """Free this thread's reused buffers (they are re-created on the next use), e.g. before measuring memory."""
    scratch.buffers.clear()
