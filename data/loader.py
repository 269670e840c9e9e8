"""A data loader over tensors that already hold the whole split.

:class:`InMemoryLoader` replaces ``torch.utils.data.DataLoader`` for data sets
that fit in (GPU) memory: each batch is one index operation on the image and
label tensors, on whatever device they live on.

Order is a pure function of ``(seed, epoch)``: the permutation for an epoch is
``torch.randperm(N, generator=torch.Generator().manual_seed(seed + epoch))``,
exactly like ``DistributedSampler``, so a resumed run that calls
``set_epoch(epoch)`` sees the same batches without saving loader state.
Call ``set_epoch`` before each epoch (iterating does not advance the epoch).

Sharding (``world_size > 1``) follows ``DistributedSampler``: by default the
permutation is padded by repeating its first indices until its length is a
multiple of ``world_size`` (so every rank has the same number of batches);
with ``drop_last=True`` the tail is dropped instead.  Rank ``r`` takes
positions ``r, r + world_size, ...`` of the (padded) permutation.
``drop_last`` also drops the last incomplete batch of each rank.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from util.errors import UserError

__all__ = ["InMemoryLoader", "take_subset", "random_crop_flip"]

_PAD = 4


def random_crop_flip(
    x: torch.Tensor,
    offsets: torch.Tensor,
    flips: torch.Tensor,
    pad: int = _PAD,
    pad_value: float = 0.0,
) -> torch.Tensor:
    """CIFAR-style augmentation of a batch ``B x C x H x W``.

    Pads by ``pad`` on every side with ``pad_value``, crops ``H x W`` at
    ``offsets[b] = (dy, dx)`` (each in ``0 .. 2 * pad``) and mirrors the
    samples where ``flips[b]`` is true.  Deterministic given its arguments.
    """
    b, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad), value=pad_value)
    wp = w + 2 * pad
    offsets = offsets.to(dev)
    flips = flips.to(dev)
    rows = offsets[:, 0:1] + torch.arange(h, device=dev)  # B x H
    fwd = torch.arange(w, device=dev)
    cols = offsets[:, 1:2] + torch.where(flips[:, None], fwd.flip(0), fwd)  # B x W
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, flat).view(b, c, h, w)


class InMemoryLoader:
    """Iterate ``(x, y)`` batches of in-memory tensors; see the module docstring."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        augment: bool = False,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        pad_value: float = 0.0,
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        if labels.device != images.device:
            raise ValueError(f"images on {images.device} but labels on {labels.device}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if augment and images.dim() != 4:
            raise ValueError("augment=True needs N x C x H x W images")
        if images.shape[0] == 0:
            raise ValueError("cannot load an empty data set")
        self.images = images
        self.labels = labels
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.augment = augment
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.pad_value = pad_value
        self.epoch = 0

    @property
    def num_examples(self) -> int:
        """Examples this rank sees per epoch (after padding/dropping)."""
        n = self.images.shape[0]
        if self.world_size == 1:
            return n
        if self.drop_last:
            return n // self.world_size
        return -(-n // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation/augmentation the next iteration uses."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        m = self.num_examples
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

    def _indices(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        n = self.images.shape[0]
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        offsets = flips = None
        if self.augment:
            # drawn for every example of the epoch, so a sample's augmentation does
            # not depend on the rank or batch it lands in
            offsets = torch.randint(0, 2 * _PAD + 1, (n, 2), generator=gen)
            flips = torch.rand(n, generator=gen) < 0.5
        if self.world_size > 1:
            total = self.num_examples * self.world_size
            if total > n:  # pad by wrapping around, as DistributedSampler does
                reps = -(-total // n)
                pos = torch.arange(n).repeat(reps)[:total]
            else:
                pos = torch.arange(total)
            pos = pos[self.rank :: self.world_size]
            perm = perm[pos]
            if offsets is not None and flips is not None:
                offsets, flips = offsets[pos], flips[pos]
        return perm, offsets, flips

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm, offsets, flips = self._indices()
        dev = self.images.device
        perm_dev = perm.to(dev)
        if offsets is not None and flips is not None:
            offsets, flips = offsets.to(dev), flips.to(dev)  # one copy per epoch, not per batch
        m = perm.shape[0]
        stop = (m // self.batch_size) * self.batch_size if self.drop_last else m
        for start in range(0, stop, self.batch_size):
            idx = perm_dev[start : start + self.batch_size]
            x = self.images.index_select(0, idx)
            y = self.labels.index_select(0, idx)
            if offsets is not None and flips is not None:
                sl = slice(start, start + self.batch_size)
                x = random_crop_flip(x, offsets[sl], flips[sl], pad_value=self.pad_value)
            yield x, y


def take_subset(
    images: torch.Tensor, labels: torch.Tensor, n: int | None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` examples after a seeded shuffle (all of them if ``n`` is None).

    Deterministic in ``seed``; the same ``(n, seed)`` always picks the same
    examples, and a smaller ``n`` picks a prefix of a larger one's selection.
    """
    total = images.shape[0]
    if n is None:
        return images, labels
    if not 0 < n <= total:
        raise UserError(f"--subset must be between 1 and {total} (the training-set size), got {n}")
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(total, generator=gen)[:n].to(images.device)
    return images.index_select(0, idx), labels.index_select(0, idx.to(labels.device))
