"""The callback on a PanoLLaVA-shaped training module: the right parts found, live == offline."""

from __future__ import annotations

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
    def __init__(self, folder):
        super().__init__()
        self.vision_encoder = VisionBackbone(folder)
        self.resampler_module = ResamplerModule()
        self.resampler = self.resampler_module  # PanoLLaVA's alias
        self.language_model = nn.Linear(24, 4)


class PanoramaTrainingModule(LightningModule):
    def __init__(self, config):
        super().__init__()
        self.save_hyperparameters()
        self.model = VLM(config["models"]["vision_name"])

    def training_step(self, batch, batch_idx):
        feats = self.model.vision_encoder(batch)["vision_features"]
        return self.model.language_model(self.model.resampler(feats)).pow(2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.rand(4, 3, tiny.SIZE, tiny.SIZE), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_callback_finds_panollava_parts_and_runner_agrees(tmp_path, capsys):
    folder = tiny.siglip_folder(tmp_path / "siglip")
    config = {"models": {"vision_name": str(folder), "use_vicreg_norm": True, "resampler_type": "mlp",
                         "latent_dimension": 24, "resampler_config": {"hidden_dim": 32, "depth": 3}},
              "image_processing": {"crop_strategy": "e2p", "image_size": [tiny.SIZE, tiny.SIZE]}}
    torch.manual_seed(0)
    module = PanoramaTrainingModule(config)
    cb = PanoVizCallback(probe=None, crop_strategy="e2p", image_size=tiny.SIZE, strict=True)
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=2, accelerator="cpu", logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[cb, ModelCheckpoint(dirpath=tmp_path / "run" / "checkpoints", save_last=True)])
    trainer.fit(module)
    state = cb.state_dict()
    assert (state["encoder_path"], state["resampler_path"]) == ("model.vision_encoder.encoder",
                                                                "model.resampler_module.resampler")
    assert state["vision_stage"] == {"family": "panollava", "revision": "head"}
    assert len(cb.history) == 2 and "resampled/overlap_cosine" in cb.history[-1]["scalars"]
    # the live resampled level is norm + resampler on the encoder's tokens, as the model computes it
    encoder, resampler = cb._resolve_modules(module)
    assert isinstance(resampler, PanoLLaVAResampler) and resampler.norm is module.model.vision_encoder.norm
    code = main(["--checkpoint", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--output_dir",
                 str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    assert "PanoLLaVA head layout" in out and "with the VICReg LayerNorm" in out
    assert f"Live analysis at step {trainer.global_step}:" in out and "values reproduced" in out
