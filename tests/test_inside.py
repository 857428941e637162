"""Tests of panoviz_callback.inside (+ inside_render): options, the planted query on the sphere,
the callback with everything on (training bit-identical), the runner and the CLI flags."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import SiglipVisionConfig, SiglipVisionModel

import _tiny_module as tiny
from panoviz_callback import PanoVizCallback
from panoviz_callback.analysis import Analyzer
from panoviz_callback.cli import main
from panoviz_callback.inside import InsideOptions
from panoviz_callback.inside_render import INSIDE_FILES, inside_images, write_inside_figures
from panoviz_callback.models import build_resampler
from panoviz_callback.panorama import synthetic_panorama
from panoviz_callback.projection import lonlat_to_direction
from panoviz_callback.report import load_similarity_json, write_reports
from panoviz_callback.views import make_views

_INSIDE_TAGS = {f"panoviz/{stem}" for stem in INSIDE_FILES.values()}


# ------------------------------------------------------------------------- options
@pytest.mark.parametrize(("value", "error", "match"), [
    ({"layers": "last"}, ValueError, r"Argument `layers` must be None, 'all' or a list of ints, got 'last'"),
    ({"layers": []}, ValueError, "Expected at least one layer"),
    ({"attention": 1}, TypeError, "Expected `attention` to be a bool"),
    ({"top_queries": 0}, ValueError, r"Argument `top_queries` must be in \[1, inf\]"),
    ({"colour": True}, ValueError, r"Unknown `inside` options \['colour'\]"),
    (3, TypeError, "Expected `inside` to be None, a bool, a dict or InsideOptions"),
])
def test_options_exceptions(value, error, match):
    with pytest.raises(error, match=match):
        InsideOptions.from_value(value)


def test_options_values():
    assert InsideOptions.from_value(None) is None and InsideOptions.from_value(False) is None
    assert InsideOptions.from_value({"attention": False}) is None  # nothing on: off
    everything = InsideOptions.from_value(True)
    assert everything.attention and everything.agreement and everything.layers == "all"
    opts = InsideOptions.from_value({"layers": [0, -1], "pano_hw": [32, 64]})
    assert opts.layers == (0, -1) and opts.pano_hw == (32, 64)
    assert InsideOptions.from_value(opts.to_dict()) == opts
    assert Analyzer(inside=opts).settings()["inside"] == opts.to_dict()
    assert "inside" not in Analyzer().settings()


# ------------------------------------------------------------------------- planted query
class _PlantedResampler(nn.Module):
    """One cross-attention head whose query 0 matches the key of red patches (identity projections)."""

    output_layout = "queries"

    def __init__(self, strength: float = 30.0) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(3, 1, batch_first=True)
        with torch.no_grad():
            self.attn.in_proj_weight.copy_(torch.eye(3).repeat(3, 1))
            self.attn.in_proj_bias.zero_()
        self.queries = nn.Parameter(torch.tensor([[1.0, -1.0, -1.0], [0.0, 1.0, 0.0]]) * strength)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.attn(q, tokens, tokens, need_weights=False)[0]


def _patch_colours(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 8).flatten(2).transpose(1, 2)  # (V, 8*8, 3): a token is its patch's mean colour


def test_planted_query_lands_on_the_sphere_where_it_attends():
    target_lon, target_lat = 60.0, 10.0
    pano = torch.full((3, 128, 256), 0.5)
    lon = ((torch.arange(256) + 0.5) / 256 - 0.5) * 360
    lat = (0.5 - (torch.arange(128) + 0.5) / 128) * 180
    dirs = lonlat_to_direction(*torch.meshgrid(lon, lat, indexing="xy"))  # (H, W, 3)
    target = lonlat_to_direction(torch.tensor(target_lon), torch.tensor(target_lat))
    spot = dirs @ target > math.cos(math.radians(7))  # a red disc of 7 degrees
    pano[:, spot] = torch.tensor([1.0, 0.0, 0.0])[:, None]
    views = make_views(pano, "e2p", image_size=64, patch_size=8)
    result = Analyzer(metrics=[], normalize=None, bg_removal="none", inside={"attention": True, "pano_hw": [64, 128]})(
        views, _patch_colours, _PlantedResampler())
    qa = result.inside.query_attention
    assert qa.attn.shape == (8, 2, 64) and qa.grid_hw == (8, 8) and qa.site == "attn"
    sphere = qa.sphere[0]  # (H, W)
    peak = divmod(int(sphere.argmax()), sphere.shape[1])
    peak_lon = (peak[1] + 0.5) / 128 * 360 - 180
    peak_lat = 90 - (peak[0] + 0.5) / 64 * 180
    peak_dir = lonlat_to_direction(torch.tensor(peak_lon), torch.tensor(peak_lat))
    assert math.degrees(math.acos(min(float(peak_dir @ target), 1.0))) < 8.0  # within a token (11 deg)
    seeing = [k for k, c in enumerate(views.cameras) if abs(((c.yaw_deg - target_lon + 180) % 360) - 180) < 40]
    for k in seeing:  # in every view that sees the spot, query 0's mass is on the red patches
        colours = _patch_colours(views.pixels[k:k + 1])[0]
        red = colours[:, 0] - colours[:, 1] > 0.05  # patches that hold part of the disc
        assert red.any()
        assert float(qa.attn[k, 0, red].sum()) > 0.9
    pair = views.pairs.index((1, 2))  # both tiles (yaw 45, 90) see the spot
    assert float(qa.agreement[pair]) > 0.5
    assert float(qa.entropy[0]) < float(qa.entropy[1])  # the planted query is the focused one
    assert qa.top(1) == [0]
    assert result.inside.encoder_attention is None
    assert "not an nn.Module" in result.inside.skipped["encoder_attention"]


# ------------------------------------------------------------------------- callback
class _QFormerModule(LightningModule):
    """A 2-layer SigLIP (32 px, 4 x 4 tokens) + our QFormer resampler, with a dropout."""

    def __init__(self) -> None:
        super().__init__()
        cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=32, patch_size=8, vision_use_head=False)
        self.vision_encoder = SiglipVisionModel(cfg)
        self.resampler = build_resampler("qformer", 32, 16, num_queries=4, depth=2)
        self.dropout = nn.Dropout(0.2)
        self.data = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens = self.vision_encoder(pixel_values=batch[0]).last_hidden_state
        return (self.resampler(self.dropout(tokens)) - 1).pow(2).mean()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.data), batch_size=4, shuffle=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _fit(root: Path, callbacks: list, logger: Any) -> LightningModule:
    seed_everything(0, verbose=False)
    model = _QFormerModule()
    trainer = Trainer(default_root_dir=root, max_epochs=2, limit_train_batches=2, accelerator="cpu", devices=1,
                      logger=logger, callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(model)
    return model


def test_callback_with_everything_on_leaves_training_bit_identical(tmp_path):
    cb = PanoVizCallback(probe=synthetic_panorama(64), crop_strategy="e2p", image_size=32,
                         crop_options={"patch_size": 8}, metrics=["overlap_cosine"], strict=True, inside=True,
                         save_dir=tmp_path / "files")
    logger = TensorBoardLogger(tmp_path, name="tb")
    with_cb = _fit(tmp_path / "a", [cb], logger)
    without = _fit(tmp_path / "b", [], False)
    for (name, a), b in zip(with_cb.state_dict().items(), without.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for module in with_cb.modules():  # our hooks were removed (transformers installs and keeps its own)
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            assert not any(getattr(h, "__module__", "").startswith("panoviz_callback") for h in hooks.values())
    assert len(cb.history) == 2
    scalars = cb.history[-1]["scalars"]
    for key in ("resampled/attention_entropy", "resampled/query_agreement", "vision_encoder/attention_entropy",
                "vision_encoder/layers/0/overlap_cosine", "vision_encoder/layers/2/overlap_cosine",
                "resampled/layers/1/token_cosine"):
        assert key in scalars, key
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert _INSIDE_TAGS <= set(acc.Tags()["images"])
    assert [e.step for e in acc.Images("panoviz/layer_sweep")] == [2, 4]
    logged = acc.Scalars("panoviz/resampled/query_agreement")
    assert logged[-1].value == pytest.approx(scalars["resampled/query_agreement"], abs=1e-6)
    stems = {p.name for p in (tmp_path / "files").iterdir()}
    assert {f"{stem}_step00000004.png" for stem in INSIDE_FILES.values()} <= stems


def test_callback_default_has_no_inside_part(tmp_path):
    cb = PanoVizCallback(probe=synthetic_panorama(64), crop_strategy="e2p", image_size=32,
                         crop_options={"patch_size": 8}, metrics=["overlap_cosine"], strict=True)
    _fit(tmp_path, [cb], False)
    assert cb.last_result.inside is None and "inside" not in cb.state_dict()["settings"]
    scalars = cb.history[-1]["scalars"]
    assert "vision_encoder/overlap_cosine" in scalars
    assert not [k for k in scalars if "/layers/" in k or k.endswith(("attention_entropy", "query_agreement"))]


# ------------------------------------------------------------------------- reports and figures
def test_reports_and_figures(tmp_path):
    torch.manual_seed(0)
    enc = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=32, patch_size=8,
                                               vision_use_head=True)).eval()
    views = make_views(synthetic_panorama(64), "anyres_e2p", image_size=32, patch_size=8)
    result = Analyzer(metrics=["overlap_cosine"], inside=True)(views, enc, build_resampler("mlp", 32, 16).eval())
    assert result.inside.encoder_attention.kind == "probe"
    assert "query_attention" not in result.inside.skipped  # an MLP has no queries: nothing to skip
    assert set(result.inside.agreement) == {"vision_encoder", "resampled"}
    paths = write_reports(result, tmp_path, "run")
    data = load_similarity_json(paths["json"])
    inside = data["inside"]
    assert inside["encoder_attention"]["kind"] == "probe" and len(inside["encoder_attention"]["entropy_per_view"]) == 9
    assert inside["layer_sweep"]["levels"]["vision_encoder"]["layers"] == ["0", "1", "2"]
    assert 0 < inside["agreement_panorama"]["vision_encoder"]["covered_fraction"] < 1
    files = write_inside_figures(result, tmp_path, "run")
    assert set(files) == {"encoder_attention", "layer_sweep", "agreement"}
    images = inside_images(result)
    assert set(images) == {"panoviz/encoder_attention", "panoviz/layer_sweep", "panoviz/agreement_panorama"}
    assert all(im.dtype == torch.uint8 and im.shape[0] == 3 for im in images.values())


# ------------------------------------------------------------------------- runner and CLI
@pytest.fixture(scope="module")
def qformer_run(tmp_path_factory):
    """PanoVisionModule (tiny SigLIP + QFormer) trained 1 epoch with PanoVizCallback(inside=True)."""
    from panoviz_callback.models import PanoDataModule, PanoVisionModule

    root = tmp_path_factory.mktemp("qformer")
    seed_everything(0, verbose=False)
    model = PanoVisionModule("tiny", vision_overrides={"image_size": tiny.SIZE}, image_size=tiny.SIZE,
                             projector_dim=32, resampler_type="qformer")
    data = PanoDataModule(num_synthetic=2, synthetic_height=64, image_size=tiny.SIZE, batch_size=2)
    cb = PanoVizCallback(probe=str(tiny.write_panorama(root / "probe.png", seed=5)), crop_strategy="e2p",
                         image_size=tiny.SIZE, metrics=["token_cosine", "overlap_cosine"], strict=True,
                         inside={"attention": True, "layers": "all", "agreement": True, "pano_hw": [64, 128]})
    trainer = Trainer(default_root_dir=root, max_epochs=1, accelerator="cpu", devices=1, logger=False,
                      callbacks=[cb, ModelCheckpoint(dirpath=root / "ckpt", save_last=True)],
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    return root / "ckpt" / "last.ckpt", cb


def test_runner_reproduces_the_live_inside_analysis(qformer_run, tmp_path, capsys):
    ckpt, cb = qformer_run
    code = main(["--checkpoint", str(ckpt), "--output_dir", str(tmp_path / "out"), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    names = {p.name for p in (tmp_path / "out").iterdir()}
    report = next((tmp_path / "out").glob("similarity_*.json"))
    name = report.stem.removeprefix("similarity_")
    assert {f"{stem}_{name}.png" for stem in INSIDE_FILES.values()} <= names
    assert "values reproduced, max |difference| 0.00e+00" in out
    data = json.loads(report.read_text())
    live = cb.history[-1]["scalars"]
    for key, value in data["inside"]["scalars"].items():
        assert value == pytest.approx(live[key], abs=1e-6), key


def test_cli_flags(tmp_path_factory, tmp_path, capsys):
    trained = tiny.trained_checkpoint(tmp_path_factory)  # MLP resampler, callback without inside
    code = main(["--checkpoint", str(trained.last), "--output_dir", str(tmp_path / "a"), "--device", "cpu",
                 "--layers", "0,2", "--agreement"])
    _, err = capsys.readouterr()
    assert code == 0, err
    names = {p.name for p in (tmp_path / "a").iterdir()}
    report = next((tmp_path / "a").glob("similarity_*.json"))
    name = report.stem.removeprefix("similarity_")
    assert {f"layer_sweep_{name}.png", f"agreement_panorama_{name}.png"} <= names
    assert f"query_attention_{name}.png" not in names and f"encoder_attention_{name}.png" not in names
    data = json.loads(report.read_text())
    assert data["inside"]["layer_sweep"]["levels"]["vision_encoder"]["layers"] == ["0", "2"]
    code = main(["--checkpoint", str(trained.last), "--output_dir", str(tmp_path / "b"), "--layers", "x"])
    _, err = capsys.readouterr()
    assert code == 2 and "expected 'all' or comma-separated layer indices, got 'x'" in err
    assert not (tmp_path / "b").exists()
