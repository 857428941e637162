"""``PanoDataModule``: panoramas from a folder (or synthetic ones) cut into views.

Each sample is one panorama, turned by a random yaw (its equirectangular columns rolled)
and cut with :func:`panoviz_callback.make_views`: ``{"pixels": (V, 3, S, S), "index": i}``;
batches stack to ``(B, V, 3, S, S)``.

Randomness never comes from the global generators: the sampler draws the order and
hands each item its epoch, and the yaw of item ``i`` in epoch ``e`` comes from a NumPy
generator seeded with ``(seed, e, i)`` (and a tag), so a run is reproducible with any
``num_workers`` and the global torch/NumPy/Python random states are not consumed (the
loaders get their own ``torch.Generator`` as well).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from panoviz_callback._checks import _check_range
from panoviz_callback.panorama import IMAGE_SUFFIXES

__all__ = ["IMAGE_SUFFIXES", "PanoDataModule"]

_YAW, _ORDER = 0, 1  # stream tags: yaws and orders never share a seed


class _PanoViewDataset(Dataset):
    """Panoramas (decoded once, kept in memory) cut into views, optionally turned by a random yaw.

    Items are an index ``i`` (no rotation) or ``(i, epoch)`` from :class:`_EpochSampler`.
    """

    def __init__(self, sources: list[Any], max_width: int | None, synthetic_height: int, crop_strategy: str,
                 image_size: int, crop_options: dict[str, Any], random_yaw: bool, seed: int) -> None:
        self.sources = sources
        self.max_width, self.synthetic_height = max_width, synthetic_height
        self.crop_strategy, self.image_size, self.crop_options = crop_strategy, image_size, crop_options
        self.random_yaw, self.seed = random_yaw, seed
        self._cache: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.sources)

    def panorama(self, index: int) -> Tensor:
        """The decoded panorama ``(3, H, W)`` of item ``index`` (cached)."""
        if index not in self._cache:
            from panoviz_callback.panorama import load_panorama, synthetic_panorama

            src = self.sources[index]
            if isinstance(src, int):
                self._cache[index] = synthetic_panorama(self.synthetic_height, seed=src)
            else:
                self._cache[index] = load_panorama(src, max_width=self.max_width)
        return self._cache[index]

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        from panoviz_callback.views import make_views

        index, epoch = (item, None) if isinstance(item, int) else item
        pano = self.panorama(index)
        if self.random_yaw and epoch is not None:
            shift = int(np.random.default_rng([self.seed, _YAW, epoch, index]).integers(pano.shape[-1]))
            pano = torch.roll(pano, shifts=shift, dims=-1)  # (3, H, W), scene turned by shift / W * 360 deg
        views = make_views(pano, self.crop_strategy, self.image_size, **self.crop_options)
        return {"pixels": views.pixels, "index": index}


class _EpochSampler(Sampler):
    """Yields ``(index, epoch)``; shuffles with its own generator seeded by ``(seed, epoch)``.

    The epoch is the one given to :meth:`set_epoch` (Lightning calls it before each
    epoch), else the number of earlier passes.
    """

    def __init__(self, size: int, shuffle: bool, seed: int) -> None:
        self.size, self.shuffle, self.seed, self.epoch = size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        self.epoch += 1
        if self.shuffle:
            order = np.random.default_rng([self.seed, _ORDER, epoch]).permutation(self.size).tolist()
        else:
            order = range(self.size)
        return iter([(int(i), epoch) for i in order])


class PanoDataModule(pl.LightningDataModule):
    """Serve panoramas cut into views for :class:`~panoviz_callback.models.PanoVisionModule`.

    Args:
        data_dir: folder of panoramas (JPEG/PNG/WebP/TIFF, any size, any count, not
            searched recursively); ``None`` uses ``num_synthetic`` synthetic panoramas.
        num_synthetic: synthetic training panoramas (``synthetic_panorama(seed=i)``).
        synthetic_height: height ``H`` of the synthetic panoramas (width ``2 H``); ``None``:
            ``2 * image_size``, enough for 90 deg views to sample about one panorama pixel per
            view pixel.
        max_width: panoramas from files wider than this are downscaled on load.
        crop_strategy: ``make_views`` strategy; must match the model's.
        image_size: view size ``S``; must match the model's.
        crop_options: options of the crop strategy; must match the model's.
        batch_size: panoramas per batch ``B``.
        num_workers: DataLoader worker processes.
        random_yaw: turn every training panorama by a random yaw each epoch.
        shuffle: shuffle the training order each epoch.
        num_val: panoramas held out for validation (the last files of the sorted folder,
            or synthetic seeds after the training ones), served without rotation by
            ``val_dataloader``; ``0``: no validation (the module then has no ``val_dataloader``,
            as with ``LightningDataModule.from_datasets``).
        seed: seed of the order and the yaws.

    Decoded panoramas are kept in memory (``3 * H * W * 4`` bytes each; use ``max_width``
    for large folders). The folder is listed and the first panorama checked in :meth:`setup`.

    Example::

        >>> dm = PanoDataModule(num_synthetic=4, image_size=64, batch_size=2)
        >>> dm.setup("fit")
        >>> next(iter(dm.train_dataloader()))["pixels"].shape
        torch.Size([2, 8, 3, 64, 64])
    """

    def __init__(
        self,
        data_dir: str | None = None,
        num_synthetic: int = 16,
        synthetic_height: int | None = None,
        max_width: int | None = 2048,
        crop_strategy: str = "e2p",
        image_size: int = 224,
        crop_options: dict[str, Any] | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        random_yaw: bool = True,
        shuffle: bool = True,
        num_val: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if data_dir is not None and not Path(data_dir).is_dir():
            raise ValueError(
                f"Argument `data_dir` must be a folder of panoramas, got {str(data_dir)!r} (not a folder)."
            )
        _check_range(num_synthetic, "num_synthetic", 1)
        _check_range(batch_size, "batch_size", 1)
        _check_range(num_workers, "num_workers", 0)
        _check_range(num_val, "num_val", 0)
        _check_range(seed, "seed", 0)
        self.save_hyperparameters()
        self.train_set: _PanoViewDataset | None = None
        self.val_set: _PanoViewDataset | None = None
        if num_val:  # like LightningDataModule.from_datasets: no method, no validation loop (and no warning)
            self.val_dataloader = self._val_dataloader

    def _sources(self) -> tuple[list[Any], list[Any]]:
        h = self.hparams
        if h.data_dir is None:
            return list(range(h.num_synthetic)), list(range(h.num_synthetic, h.num_synthetic + h.num_val))
        files = sorted(p for p in Path(h.data_dir).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) <= h.num_val:
            raise ValueError(
                f"The folder {h.data_dir} holds {len(files)} panorama(s) ({', '.join(IMAGE_SUFFIXES)}); "
                f"need more than num_val={h.num_val}."
            )
        split = len(files) - h.num_val
        return [str(f) for f in files[:split]], [str(f) for f in files[split:]]

    def setup(self, stage: str | None = None) -> None:
        """List the panoramas and check the crop settings on the first one."""
        if self.train_set is not None:
            return
        h = self.hparams
        train, val = self._sources()
        common = dict(max_width=h.max_width, synthetic_height=h.synthetic_height or 2 * h.image_size,
                      crop_strategy=h.crop_strategy, image_size=h.image_size, crop_options=dict(h.crop_options or {}),
                      seed=h.seed)
        self.train_set = _PanoViewDataset(train, random_yaw=h.random_yaw, **common)
        self.val_set = _PanoViewDataset(val, random_yaw=False, **common) if val else None
        self.num_views = self.train_set[0]["pixels"].shape[0]

    def train_dataloader(self) -> DataLoader:
        """Training batches ``{"pixels": (B, V, 3, S, S), "index": (B,)}``."""
        h = self.hparams
        sampler = _EpochSampler(len(self.train_set), h.shuffle, h.seed)
        return self._loader(self.train_set, sampler)

    def _val_dataloader(self) -> DataLoader:
        """Validation batches (no rotation); becomes ``val_dataloader`` when ``num_val > 0``."""
        return self._loader(self.val_set, None)

    def _loader(self, dataset: Dataset, sampler: Sampler | None) -> DataLoader:
        h = self.hparams
        return DataLoader(
            dataset, batch_size=h.batch_size, sampler=sampler, shuffle=False, num_workers=h.num_workers,
            persistent_workers=h.num_workers > 0, generator=torch.Generator().manual_seed(h.seed),
        )
