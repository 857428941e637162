"""Test helpers for the runner tests: tiny models and checkpoints of the three kinds, made offline.

- :class:`TinyVLM`: a LightningModule with ``model.vision_tower`` (a 2-layer SigLIP) and
  ``model.mm_projector`` (an MLP), plus a stand-in "language model"; counts its constructions
  (``--module _tiny_module:TinyVLM``).
- :func:`module_checkpoint`: a ``TinyVLM`` checkpoint (``state_dict`` + ``hyper_parameters``).
- :func:`siglip_folder`: a tiny SigLIP vision model written with ``save_pretrained``.
- :func:`panollava_checkpoint`: a hand-written PanoLLaVA-layout checkpoint.
- :func:`trained_checkpoint`: ``PanoVisionModule`` trained for 2 epochs with ``PanoVizCallback``,
  a real ``TensorBoardLogger`` and ``ModelCheckpoint`` (once per test session).
- :func:`write_panorama`: a synthetic panorama saved as PNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn

SIZE = 64  # view size of every tiny model (4 x 4 tokens of 16 px)
_SESSION: dict[str, Any] = {}


def _siglip(seed: int = 0, hidden: int = 32):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                             num_attention_heads=2, image_size=SIZE, patch_size=16, vision_use_head=False)
    return SiglipVisionModel(cfg).eval()


class TinyVLM(LightningModule):
    """A VLM-shaped module: ``model.vision_tower`` + ``model.mm_projector`` + ``language_model``."""

    constructions = 0

    def __init__(self, hidden: int = 32, out_dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        TinyVLM.constructions += 1
        self.model = nn.Module()
        self.model.vision_tower = _siglip(seed, hidden)
        self.model.mm_projector = nn.Sequential(nn.Linear(hidden, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        self.language_model = nn.Linear(out_dim, 8)


@dataclass
class Opaque:
    """Not a tensor or plain type: a checkpoint holding it needs full unpickling."""

    value: int = 1


def module_checkpoint(path: Path, *, seed: int = 1, opaque: bool = False) -> tuple[Path, TinyVLM]:
    """Save a ``TinyVLM`` (trained weights = a different seed than the default construction)."""
    model = TinyVLM(seed=seed)
    torch.nn.init.normal_(model.model.mm_projector[0].weight, generator=torch.Generator().manual_seed(seed))
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "global_step": 7,
            "epoch": 0}
    if opaque:
        ckpt["extra"] = Opaque(3)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path, model


def siglip_folder(path: Path, seed: int = 0) -> Path:
    """A tiny SigLIP vision model written with ``save_pretrained`` (the ``vision_name`` of PanoLLaVA tests)."""
    if not (path / "config.json").exists():
        _siglip(seed).save_pretrained(path)
    return path


def panollava_checkpoint(path: Path, folder: Path, *, encoder_prefix: str = "model.vision_encoder.",
                         resampler_prefix: str = "model.resampler_module.resampler.", key_head: str = "keep",
                         hparams: dict | None = None, datamodule: dict | None = None,
                         seed: int = 2) -> tuple[Path, nn.Module, nn.Module]:
    """A PanoLLaVA-layout checkpoint: returns ``(path, reference encoder, reference MLP)``.

    The encoder weights are a fresh seed (not the folder's), so loading them can be checked.
    ``key_head``: ``"keep"`` the encoder's own keys, ``"add"`` / ``"strip"`` a leading ``vision_model.``
    (the key layout differs between transformers versions and PanoLLaVA wrappers).
    """
    from panoviz_callback.models import build_resampler

    encoder = _siglip(seed)
    torch.manual_seed(seed)
    mlp = build_resampler("mlp", 32, 24).eval()
    enc = encoder.state_dict()
    if key_head == "strip":
        enc = {k.removeprefix("vision_model."): v for k, v in enc.items()}
    elif key_head == "add":
        enc = {k if k.startswith("vision_model.") else f"vision_model.{k}": v for k, v in enc.items()}
    state = {f"{encoder_prefix}{k}": v for k, v in enc.items()}
    state.update({f"{resampler_prefix}{k}": v for k, v in mlp.state_dict().items()})
    state["model.language_model.lm_head.weight"] = torch.zeros(64, 16)  # never rebuilt
    h = {"vision_name": str(folder), "resampler_type": "mlp", "latent_dimension": 24,
         "language_model_name": "Qwen/Qwen3-0.6B"} if hparams is None else hparams
    ckpt = {"state_dict": state, "hyper_parameters": h, "global_step": 11,
            "datamodule_hyper_parameters": {"crop_strategy": "e2p", "image_size": SIZE, "fov_deg": 90.0,
                                            "overlap_ratio": 0.5} if datamodule is None else datamodule}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path, encoder, mlp


def write_panorama(path: Path, seed: int = 0, height: int = 64) -> Path:
    """A synthetic panorama (``2 H x H``) saved as PNG."""
    from PIL import Image

    from panoviz_callback.panorama import synthetic_panorama

    pano = synthetic_panorama(height, seed=seed)
    array = (pano.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@dataclass
class Trained:
    root: Path
    tb_dir: Path
    last: Path
    first: Path
    probe: Path


def trained_checkpoint(tmp_path_factory: Any) -> Trained:
    """Train ``PanoVisionModule`` (tiny preset, 64 px views) for 2 epochs with the callback; once per session."""
    if "trained" in _SESSION:
        return _SESSION["trained"]
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from panoviz_callback import PanoVizCallback
    from panoviz_callback.models import PanoDataModule, PanoVisionModule

    root = tmp_path_factory.mktemp("trained")
    probe = write_panorama(root / "probe.png", seed=5, height=64)
    seed_everything(0, verbose=False)
    model = PanoVisionModule("tiny", vision_overrides={"image_size": SIZE}, image_size=SIZE, projector_dim=32)
    data = PanoDataModule(num_synthetic=2, synthetic_height=64, image_size=SIZE, batch_size=2)
    callback = PanoVizCallback(probe=str(probe), crop_strategy="e2p", image_size=SIZE, strict=True)
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, save_top_k=-1, every_n_epochs=1)
    logger = TensorBoardLogger(root, name="tb")
    trainer = Trainer(default_root_dir=root, max_epochs=2, accelerator="cpu", devices=1, logger=logger,
                      callbacks=[callback, checkpoints], enable_progress_bar=False, enable_model_summary=False,
                      log_every_n_steps=1)
    trainer.fit(model, data)
    first = next((root / "checkpoints").glob("epoch=0*.ckpt"))
    _SESSION["trained"] = Trained(root, Path(logger.log_dir), root / "checkpoints" / "last.ckpt", first, probe)
    return _SESSION["trained"]
