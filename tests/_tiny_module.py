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


PANOLLAVA_PREFIXES = {  # revision -> (encoder, VICReg norm, resampler) key prefixes of PanoLLaVA's own modules
    "head": ("model.vision_encoder.encoder.", "model.vision_encoder.norm.", "model.resampler_module.resampler."),
    "dc64bc5": ("model.vision_backbone.encoder.", "model.vision_backbone.norm.", "model.resampler_module.resampler."),
    "7227614": ("model.vision_encoder.", "model.vicreg_norm.", "model.resampler."),
}


def _cora_config(mod: Any, models: dict, images: dict) -> Any:
    """A pydantic ``CORAConfig`` look-alike whose classes live in the (temporary) module ``mod``."""
    from typing import Optional

    from pydantic import BaseModel, Field

    class ModelConfig(BaseModel):
        vision_name: str = "google/siglip-base-patch16-224"
        use_vicreg_norm: bool = False
        language_model_name: str = "Qwen/Qwen2.5-0.5B-Instruct"
        resampler_type: str = "bimamba"
        latent_dimension: int = 768
        resampler_config: dict = Field(default_factory=dict)
        model_config = {"extra": "allow"}

    class ImageProcessingConfig(BaseModel):
        crop_strategy: str = "anyres_e2p"
        image_size: Optional[list] = None
        overlap_ratio: float = 0.5
        fov_deg: float = 90.0
        model_config = {"extra": "allow"}

    class CORAConfig(BaseModel):
        models: ModelConfig = Field(default_factory=ModelConfig)
        image_processing: ImageProcessingConfig = Field(default_factory=ImageProcessingConfig)
        data: dict = Field(default_factory=dict)
        model_config = {"extra": "allow"}

    for cls in (ModelConfig, ImageProcessingConfig, CORAConfig):
        cls.__module__, cls.__qualname__ = mod.__name__, cls.__name__
        setattr(mod, cls.__name__, cls)
    return CORAConfig(models=ModelConfig(**models), image_processing=ImageProcessingConfig(**images))


def save_without_module(obj_factory: Any, path: Path, module: str = "cora.config.schema") -> None:
    """``torch.save(obj_factory(mod))`` while the package ``module`` exists, then forget it (not importable)."""
    import sys
    import types

    names = module.split(".")
    created = []
    for i in range(len(names)):
        name = ".".join(names[: i + 1])
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
            created.append(name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj_factory(sys.modules[module]), path)
    finally:
        for name in created:
            del sys.modules[name]


def panollava_checkpoint(path: Path, folder: Path, *, revision: str = "dc64bc5", use_norm: bool | None = None,
                         key_head: str = "keep", hparams: dict | None = None, datamodule: dict | None = None,
                         seed: int = 2) -> tuple[Path, nn.Module, Any]:
    """A checkpoint with the exact key layout and settings structure of PanoLLaVA at ``revision``.

    Returns ``(path, reference encoder, reference stage)``: ``reference stage(tokens)`` is the
    VICReg LayerNorm (when on) and the MLP resampler written out by hand with the saved weights.
    The encoder weights are a fresh seed (not the folder's), so loading them can be checked.
    ``key_head="add"`` writes the encoder keys with a leading ``vision_model.`` (transformers 4.x
    full-model naming). ``use_norm`` defaults to each revision's default (off at head, on before).
    """
    import torch.nn.functional as F

    from panoviz_callback.models import build_resampler

    enc_prefix, norm_prefix, res_prefix = PANOLLAVA_PREFIXES[revision]
    use_norm = revision != "head" if use_norm is None else use_norm
    encoder = _siglip(seed)
    torch.manual_seed(seed)
    mlp = build_resampler("mlp", 32, 24).eval()
    norm_w, norm_b = 1 + 0.1 * torch.randn(32), 0.1 * torch.randn(32)
    enc = encoder.state_dict()
    if key_head == "add":
        enc = {f"vision_model.{k}": v for k, v in enc.items()}
    state = {f"{enc_prefix}{k}": v for k, v in enc.items()}
    if use_norm:
        state.update({f"{norm_prefix}weight": norm_w, f"{norm_prefix}bias": norm_b})
    state.update({f"{res_prefix}{k}": v for k, v in mlp.state_dict().items()})
    if revision == "head":  # `model.resampler` is an alias of the wrapper: the same tensors twice
        state.update({f"model.resampler.resampler.{k}": v for k, v in mlp.state_dict().items()})
    state["model.language_model.lm_head.weight"] = torch.zeros(64, 16)  # never rebuilt
    crop = {"crop_strategy": "e2p", "image_size": SIZE, "fov_deg": 90.0, "overlap_ratio": 0.5}
    flat = {"vision_name": str(folder), "resampler_type": "mlp", "latent_dimension": 24,
            "language_model_name": "Qwen/Qwen3-0.6B", "stage": "vision"}
    w = {k: v for k, v in mlp.state_dict().items()}

    def stage(tokens):  # (V, N, 32) -> (V, N, 24), by hand
        x = F.layer_norm(tokens, (32,), norm_w, norm_b, eps=1e-5) if use_norm else tokens
        for i in (0, 3):  # Linear -> LayerNorm -> GELU, twice
            x = F.linear(x, w[f"mlp.{i}.weight"], w[f"mlp.{i}.bias"])
            x = F.gelu(F.layer_norm(x, (x.shape[-1],), w[f"mlp.{i + 1}.weight"], w[f"mlp.{i + 1}.bias"], eps=1e-5))
        return F.linear(x, w["mlp.6.weight"], w["mlp.6.bias"])

    if revision == "head":
        models = {"vision_name": str(folder), "use_vicreg_norm": use_norm, "resampler_type": "mlp",
                  "latent_dimension": 24, "resampler_config": {"hidden_dim": 32, "depth": 3, "use_ln": True}}
        images = {"crop_strategy": "e2p", "image_size": [SIZE, SIZE], "overlap_ratio": 0.5, "fov_deg": 90.0}
        if hparams is not None:
            models = {**models, **hparams}
        save_without_module(lambda mod: {
            "state_dict": state, "global_step": 11, "epoch": 0,
            "hyper_parameters": {"config": _cora_config(mod, models, images), "stage": "vision",
                                 "vision_trainable_blocks": 0}}, path)
    else:
        ckpt = {"state_dict": state, "hyper_parameters": flat if hparams is None else hparams, "global_step": 11,
                "datamodule_hyper_parameters": crop if datamodule is None else datamodule}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, path)
    return path, encoder, stage


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
