"""The callback on a PanoLLaVA-shaped training module: the right parts found, live == offline."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import _tiny_module as tiny
from panoviz_callback import PanoVizCallback
from panoviz_callback.cli import main
from panoviz_callback.models.resamplers import MLPResampler
from panoviz_callback.panollava import PanoLLaVAResampler


class VisionBackbone(nn.Module):
    """Like PanoLLaVA's head wrapper: the HF model under ``encoder``, a LayerNorm, a dict output."""

    def __init__(self, folder):
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(folder)
        self.norm = nn.LayerNorm(32)

    def forward(self, pixel_values):
        return {"vision_features": self.norm(self.encoder(pixel_values=pixel_values).last_hidden_state)}


class ResamplerModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.resampler = MLPResampler(32, 24, hidden_dim=32)

    def forward(self, x):
        return self.resampler(x)


class VLM(nn.Module):
    """The vision side of PanoLLaVA's model at ``revision`` (attribute names as in its code)."""

    def __init__(self, folder, revision):
        super().__init__()
        from transformers import AutoModel

        self.revision = revision
        if revision == "head":
            self.vision_encoder = VisionBackbone(folder)
            self.resampler_module = ResamplerModule()
            self.resampler = self.resampler_module  # PanoLLaVA's alias
        elif revision == "dc64bc5":
            self.vision_backbone = VisionBackbone(folder)
            self.resampler_module = ResamplerModule()
        else:
            self.vision_encoder = AutoModel.from_pretrained(folder)
            self.vicreg_norm = nn.LayerNorm(32)
            self.resampler = MLPResampler(32, 24, hidden_dim=32)
        self.language_model = nn.Linear(24, 4)

    def vision(self, pixels):
        if self.revision == "head":
            return self.resampler(self.vision_encoder(pixels)["vision_features"])
        if self.revision == "dc64bc5":
            return self.resampler_module(self.vision_backbone(pixels)["vision_features"])
        return self.resampler(self.vicreg_norm(self.vision_encoder(pixel_values=pixels).last_hidden_state))


class PanoramaTrainingModule(LightningModule):
    def __init__(self, config=None, vision_name=None, resampler_type="mlp", latent_dimension=24, revision="head"):
        super().__init__()
        self.save_hyperparameters()
        self.model = VLM(config["models"]["vision_name"] if config else vision_name, revision)

    def training_step(self, batch, batch_idx):
        return self.model.language_model(self.model.vision(batch)).pow(2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.rand(4, 3, tiny.SIZE, tiny.SIZE), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


_PATHS = {
    "head": ("model.vision_encoder.encoder", "model.resampler_module.resampler", "model.vision_encoder.norm"),
    "dc64bc5": ("model.vision_backbone.encoder", "model.resampler_module.resampler", "model.vision_backbone.norm"),
    "7227614": ("model.vision_encoder", "model.resampler", "model.vicreg_norm"),
}


@pytest.mark.parametrize("revision", ["head", "dc64bc5", "7227614"])
def test_callback_finds_panollava_parts_and_runner_agrees(tmp_path, capsys, revision):
    folder = tiny.siglip_folder(tmp_path / "siglip")
    torch.manual_seed(0)
    if revision == "head":
        config = {"models": {"vision_name": str(folder), "use_vicreg_norm": True, "resampler_type": "mlp",
                             "latent_dimension": 24, "resampler_config": {"hidden_dim": 32, "depth": 3}},
                  "image_processing": {"crop_strategy": "e2p", "image_size": [tiny.SIZE, tiny.SIZE]}}
        module = PanoramaTrainingModule(config=config)
    else:
        module = PanoramaTrainingModule(vision_name=str(folder), revision=revision)
    cb = PanoVizCallback(probe=None, crop_strategy="e2p", image_size=tiny.SIZE, strict=True)
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=2, accelerator="cpu", logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[cb, ModelCheckpoint(dirpath=tmp_path / "run" / "checkpoints", save_last=True)])
    trainer.fit(module)
    enc_path, res_path, norm_path = _PATHS[revision]
    state = cb.state_dict()
    assert (state["encoder_path"], state["resampler_path"]) == (enc_path, res_path)
    assert state["vision_stage"] == {"family": "panollava", "revision": revision}
    assert len(cb.history) == 2 and "resampled/overlap_cosine" in cb.history[-1]["scalars"]
    # the live resampled level is norm + resampler on the encoder's tokens, as the model computes it
    _, resampler = cb._resolve_modules(module)
    norm = module
    for part in norm_path.split("."):
        norm = getattr(norm, part)
    assert isinstance(resampler, PanoLLaVAResampler) and resampler.norm is norm
    code = main(["--checkpoint", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--output_dir",
                 str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    assert f"PanoLLaVA {revision} layout" in out and "with the VICReg LayerNorm" in out
    assert f"Live analysis at step {trainer.global_step}:" in out and "values reproduced" in out
