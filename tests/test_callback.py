"""End-to-end tests of ``PanoVizCallback`` with a real Trainer, real loggers and a tiny SigLIP."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import SiglipVisionConfig, SiglipVisionModel

from panoviz_callback import PanoVizCallback
from panoviz_callback import labels, timeline
from panoviz_callback.labels import LEVEL_TITLES
from panoviz_callback.report import METRIC_DESCRIPTIONS
from panoviz_callback._state import _check_grads_unchanged, _grad_snapshot
from panoviz_callback.panorama import PanoramaError, synthetic_panorama

_SIZE, _PATCH = 32, 8
_CHEAP_METRICS = ["token_cosine", "overlap_cosine", "linear_cka"]
_IMAGE_TAGS = {"panoviz/original_views", "panoviz/vision_encoder_pca", "panoviz/resampled_features_pca",
               "panoviz/vision_encoder_pca_panorama", "panoviz/resampled_pca_panorama", "panoviz/timeline",
               "panoviz/vision_encoder_pca_first_vs_latest", "panoviz/resampled_pca_first_vs_latest"}
_FROM_SECOND = {"panoviz/vision_encoder_pca_first_vs_latest", "panoviz/resampled_pca_first_vs_latest"}


class TinyModule(LightningModule):
    """A 2-layer SigLIP (32 px, 4x4 tokens) + MLP resampler, a dropout and a frozen BatchNorm."""

    def __init__(self, num_images: int = 8, with_val: bool = False) -> None:
        super().__init__()
        cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=_SIZE, patch_size=_PATCH, vision_use_head=False)
        self.vision_encoder = SiglipVisionModel(cfg)
        self.resampler = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 16))
        self.dropout = nn.Dropout(0.2)
        self.frozen_bn = nn.BatchNorm1d(16).requires_grad_(False).eval()
        self.data = torch.rand(num_images, 3, _SIZE, _SIZE, generator=torch.Generator().manual_seed(0))
        self.with_val = with_val
        self.steps = 0

    def train(self, mode: bool = True) -> TinyModule:
        super().train(mode)
        self.frozen_bn.eval()  # frozen: its statistics never change
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.vision_encoder(pixel_values=pixels).last_hidden_state  # (B, N, 32)
        tokens = self.resampler(self.dropout(tokens))  # (B, N, 16)
        return self.frozen_bn(tokens.transpose(1, 2)).transpose(1, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps += 1
        loss = (self(batch[0]) - 1).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", self(batch[0]).pow(2).mean())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.data), batch_size=4, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.data[:4]), batch_size=4)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


_PROBE = synthetic_panorama(128)


def _callback(**kwargs: Any) -> PanoVizCallback:
    settings = {"probe": _PROBE, "crop_strategy": "e2p", "image_size": _SIZE, "crop_options": {"patch_size": _PATCH},
                "metrics": _CHEAP_METRICS, "strict": True, **kwargs}
    return PanoVizCallback(**settings)


def _fit(tmp_path: Path, callbacks: list[Callback], *, model: LightningModule | None = None, logger: Any = True,
         seed: int = 0, ckpt_path: str | None = None, **kwargs: Any) -> tuple[Trainer, LightningModule]:
    seed_everything(seed, verbose=False)
    model = model or TinyModule()
    if logger is True:
        logger = TensorBoardLogger(tmp_path, name="tb")
    settings = {"max_epochs": 2, "limit_train_batches": 2, "limit_val_batches": 1, "num_sanity_val_steps": 0,
                "log_every_n_steps": 1, "accelerator": "cpu", **kwargs}
    trainer = Trainer(default_root_dir=tmp_path, devices=1, logger=logger, callbacks=callbacks,
                      enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                      enable_progress_bar=False, enable_model_summary=False, **settings)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model


def _decode(event: Any) -> np.ndarray:
    """A TensorBoard image event as an ``(H, W, 3)`` uint8 array."""
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


def _events(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


# ------------------------------------------------------------------------ arguments
@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"crop_strategy": "cube"}, ValueError, r"Argument `crop_strategy` must be one of \("),
    ({"on": "epoch_end"}, ValueError, r"Argument `on` must be one of \('train_epoch_end'"),
    ({"every_n_epochs": 0}, ValueError, r"Argument `every_n_epochs` must be in \[1, inf\]"),
    ({"every_n_train_steps": -2}, ValueError, r"Argument `every_n_train_steps` must be in \[1, inf\]"),
    ({"every_n_epochs": None}, ValueError, r"Argument `every_n_epochs` must be set"),
    ({"image_size": 0}, ValueError, r"Argument `image_size` must be in \[1, inf\]"),
    ({"n_components": 0}, ValueError, r"Argument `n_components` must be in \[1, inf\]"),
    ({"bg_removal": "median"}, ValueError, r"Argument `bg_removal` must be one of"),
    ({"metrics": ["cosine"]}, ValueError, r"Argument `metrics` must be one of"),
    ({"probe": torch.rand(4, 8, 16)}, ValueError, r"Expected `probe` of shape \(3, H, W\)"),
    ({"probe": torch.rand(3, 8, 16) * 2}, ValueError, r"Argument `probe` must be a uint8 tensor"),
    ({"probe": 3}, TypeError, r"Expected `probe` to be a path"),
    ({"encoder": "none"}, ValueError, r"Argument `encoder` must be 'auto'"),
    ({"resampler": 1.5}, TypeError, r"Expected `resampler` to be an attribute path"),
])
def test_exception_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        PanoVizCallback(**kwargs)


def test_auto_detection_search_order():
    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision_tower = nn.Linear(2, 2)
            self.mm_projector = nn.Linear(2, 2)

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Inner()
            self.encoder = nn.Linear(2, 2)  # the generic name comes after every specific one

    cb = PanoVizCallback()
    cb._resolve_modules(Outer())
    assert cb._paths == {"encoder": "model.vision_tower", "resampler": "model.mm_projector"}
    inner = Inner()
    cb._resolve_modules(inner)
    assert cb._paths == {"encoder": "vision_tower", "resampler": "mm_projector"}
    cb = PanoVizCallback(encoder="model.vision_tower", resampler=None)
    encoder, resampler = cb._resolve_modules(Outer())
    assert resampler is None and cb._paths == {"encoder": "model.vision_tower", "resampler": None}
    for no_resampler in (None, False, "none"):
        cb = PanoVizCallback(resampler=no_resampler)
        assert cb._resolve_modules(inner)[1] is None and cb._paths["resampler"] is None
    with pytest.raises(AttributeError, match=r"could not find the vision encoder on `Sequential`"):
        PanoVizCallback()._resolve_modules(nn.Sequential())


# ------------------------------------------------------------------------ loggers
def test_tensorboard_tags_and_counts(tmp_path):
    cb = _callback(probe=None, metrics=None, strict=False)  # the defaults: embedded probe, every metric
    trainer, _ = _fit(tmp_path, [cb], max_epochs=3)
    assert [h["step"] for h in cb.history] == [2, 4, 6]
    acc = _events(trainer.logger.log_dir)
    assert set(acc.Tags()["images"]) == _IMAGE_TAGS
    assert [e.step for e in acc.Images("panoviz/original_views")] == [2]  # first firing only
    for tag in _IMAGE_TAGS - {"panoviz/original_views"} - _FROM_SECOND:
        assert [e.step for e in acc.Images(tag)] == [2, 4, 6], tag
    for tag in _FROM_SECOND:  # the first firing has nothing to compare with
        assert [e.step for e in acc.Images(tag)] == [4, 6], tag
    # readable in a default TensorBoard card: a grid (3 x 3 tiles of 160 px for 8 views), not a 8-view strip
    for tag in ("panoviz/original_views", "panoviz/vision_encoder_pca", "panoviz/resampled_features_pca"):
        image = acc.Images(tag)[-1]
        assert 450 <= image.width <= 560 and image.height > image.width, (tag, image.width, image.height)
    for tag in ("panoviz/vision_encoder_pca_panorama", "panoviz/resampled_pca_panorama"):
        assert acc.Images(tag)[-1].width == 512, tag
    # the labels are drawn in: the logged image equals the unlabelled render except in the text bands
    logged = _decode(acc.Images("panoviz/resampled_features_pca")[-1])
    plain = labels.pca_image(cb.last_result, "resampled", step=6, epoch=2, draw_text=False).permute(1, 2, 0).numpy()
    assert logged.shape == plain.shape
    header = slice(0, 40)
    assert (logged[header] != plain[header]).any(axis=-1).mean() > 0.02  # the title: level, step, epoch
    tile = (slice(100, 240), slice(10, 150))  # inside the first tile, under the header and its caption lines
    np.testing.assert_array_equal(logged[tile], plain[tile])
    assert (logged[60:90, 4:164] != plain[60:90, 4:164]).any()  # the caption "View 0 / yaw 0° pitch 0°"
    # the timeline: one point per firing per metric and level
    _, axes = timeline.plot_timeline(cb.history)
    assert set(axes) == {name.split("/")[1] for name in cb.history[-1]["scalars"]}
    for metric, ax in axes.items():
        assert [len(line.get_xdata()) for line in ax.get_lines()] == [3, 3], metric
        assert list(ax.get_lines()[0].get_xdata()) == [2, 4, 6]
    series = timeline.timeline_series(cb.history)
    points = timeline.chart_points(series, list(axes))
    assert set(points) == set(series) and all(len(p) == 3 for p in points.values())
    logged = acc.Images("panoviz/timeline")[-1]
    assert logged.width <= 720 and logged.height == timeline.timeline_image(cb.history).shape[1]
    scalars = {t for t in acc.Tags()["scalars"] if t.startswith("panoviz/")}
    assert scalars == {f"panoviz/{name}" for name in cb.history[-1]["scalars"]}
    for level in ("vision_encoder", "resampled"):
        for metric in ("token_cosine", "overlap_cosine", "hungarian_cosine", "linear_cka", "debiased_cka", "ssim"):
            assert f"panoviz/{level}/{metric}" in scalars
    for tag in scalars:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [2, 4, 6], tag
        metric = tag.rsplit("/", 1)[1]
        description = acc.SummaryMetadata(tag).summary_description
        assert METRIC_DESCRIPTIONS.get(metric, "PCA left out") in description, tag
        assert LEVEL_TITLES[tag.split("/")[1]] in description
        assert events[-1].value == pytest.approx(cb.history[-1]["scalars"][tag.removeprefix("panoviz/")], abs=1e-6)


def _wandb_history(run_dir: Path, kind_filter: str = "history") -> list[dict[str, Any]]:
    """The history rows (or ``define_metric`` records) of an offline run, read from its ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, block, buf = [], 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # a record still being written
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({it.key or "/".join(it.nested_key): json.loads(it.value_json)
                             for it in record.history.item})
            elif record.WhichOneof("record_type") == "config" and kind_filter == "config":
                rows.append({"name": "config", **{it.key: json.loads(it.value_json) for it in record.config.update}})
            elif record.WhichOneof("record_type") == "metric" and kind_filter == "metric":
                rows.append({"name": record.metric.name, "step_metric": record.metric.step_metric,
                             "summary": record.metric.summary})
    return rows if kind_filter == "history" else [r for r in rows if "name" in r]


def test_wandb_offline_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    for name, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp_path)), ("WANDB_SILENT", "true"),
                        ("WANDB_CONSOLE", "off")):
        monkeypatch.setenv(name, value)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="panoviz-test")
    cb = _callback()
    try:
        _fit(tmp_path, [cb], logger=logger)
    finally:
        wandb.finish()
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    pngs = sorted(p.name.rsplit("_", 2)[0] for p in (run_dir / "files" / "media" / "images" / "panoviz").glob("*.png"))
    per_firing = ["vision_encoder_pca", "resampled_features_pca", "vision_encoder_pca_panorama",
                  "resampled_pca_panorama", "timeline"]
    assert pngs == sorted(["original_views", "vision_encoder_pca_first_vs_latest",
                           "resampled_pca_first_vs_latest"] + 2 * per_firing)
    for _ in range(120):  # wandb-core may still be writing the record log after finish() returns
        rows = [r for r in _wandb_history(run_dir) if "panoviz/resampled/overlap_cosine" in r]
        if len(rows) >= 2:
            break
        time.sleep(0.5)
    assert [r["trainer/global_step"] for r in rows] == [2, 4]
    assert [r["panoviz/resampled/overlap_cosine"] for r in rows] == pytest.approx(
        [h["scalars"]["resampled/overlap_cosine"] for h in cb.history], abs=1e-6)
    assert all("panoviz/resampled_pca_panorama/path" in r for r in rows)  # images and scalars in one log call
    steps = [r["_step"] for r in _wandb_history(run_dir)]
    assert steps == sorted(steps)
    # captions say what is shown and when
    caption = rows[-1]["panoviz/resampled_features_pca/caption"]
    assert caption.startswith("Resampled tokens of each view") and caption.endswith("(step 4, epoch 1)")
    assert rows[0]["panoviz/original_views/caption"].startswith("The probe's views")
    # every panoviz scalar is charted against trainer/global_step, with a summary
    metrics = {m["name"]: m for m in _wandb_history(run_dir, "metric")}
    for name in cb.history[-1]["scalars"]:
        assert metrics[f"panoviz/{name}"]["step_metric"] == "trainer/global_step", name
        assert metrics[f"panoviz/{name}"]["summary"].max and metrics[f"panoviz/{name}"]["summary"].last, name
    described = [r["panoviz_metrics"] for r in _wandb_history(run_dir, "config") if "panoviz_metrics" in r]
    entry = described[-1].get("value", described[-1])
    assert "cosine of token pairs" in entry["panoviz/resampled/overlap_cosine"]


# ------------------------------------------------------------------- side effects
class _Spy(Callback):
    """Records what training can observe at ``on_train_epoch_end`` (put one before and one after the callback).

    ``plant_grads`` gives every parameter a ``.grad`` first (the next step zeroes it), so that a change
    shows; ``reference`` (the spy before) has its ``requires_grad`` / ``.grad`` snapshot checked.
    """

    def __init__(self, plant_grads: bool = False, reference: _Spy | None = None) -> None:
        self.seen: list[dict[str, Any]] = []
        self.plant_grads, self.reference = plant_grads, reference

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for p in pl_module.parameters() if self.plant_grads else ():
            p.grad = torch.randn_like(p)
        if self.reference is not None:
            _check_grads_unchanged(pl_module, self.reference.seen[-1]["grads"])
        self.seen.append({
            "modes": [m.training for m in pl_module.modules()],
            "rng": (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()),
            "grads": _grad_snapshot(pl_module),
            "weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
        })


def test_no_side_effects(tmp_path):
    before, cb = _Spy(plant_grads=True), _callback()
    after = _Spy(reference=before)
    _, model = _fit(tmp_path, [before, cb, after], max_epochs=2)
    assert len(cb.history) == 2 and len(before.seen) == len(after.seen) == 2
    for b, a in zip(before.seen, after.seen):
        assert a["modes"] == b["modes"]
        assert torch.equal(a["rng"][0], b["rng"][0]) and np.array_equal(a["rng"][1], b["rng"][1])
        assert a["rng"][2] == b["rng"][2]
        for k, v in b["weights"].items():  # incl. the frozen BatchNorm's running statistics
            assert torch.equal(a["weights"][k], v), k
    frozen = [name for name, (requires_grad, _) in before.seen[-1]["grads"].items() if not requires_grad]
    assert frozen == ["frozen_bn.weight", "frozen_bn.bias"]
    bn = list(model.modules()).index(model.frozen_bn)
    assert all(seen["modes"][0] and not seen["modes"][bn] for seen in before.seen)  # training, BatchNorm frozen
    for level in cb.last_result.levels.values():
        tokens = level.features.tokens
        assert not tokens.requires_grad and tokens.grad_fn is None and not tokens.is_inference()


def test_weights_bit_identical_with_and_without_callback(tmp_path):
    _, with_cb = _fit(tmp_path / "a", [_callback(log_images=False)], max_epochs=3, logger=False)
    _, without = _fit(tmp_path / "b", [], max_epochs=3, logger=False)
    reference = TinyModule()
    changed = False
    for (name, a), b, r in zip(with_cb.state_dict().items(), without.state_dict().values(),
                               reference.state_dict().values()):
        assert torch.equal(a, b), name
        changed |= not torch.equal(a, r)
    assert changed  # training did change the weights


@pytest.mark.parametrize("precision", [
    "32", "bf16-mixed", "bf16-true",
    pytest.param("16-mixed", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs CUDA")),
])
def test_precision(tmp_path, precision):
    calls: list[tuple[bool, bool]] = []
    model = TinyModule()
    model.vision_encoder.register_forward_hook(
        lambda *_: calls.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"))))
    cb = _callback(log_images=False)
    accelerator = "gpu" if precision == "16-mixed" else "cpu"
    _fit(tmp_path, [cb], model=model, max_epochs=1, logger=False, precision=precision, accelerator=accelerator)
    assert len(cb.history) == 1
    assert all(np.isfinite(v) for v in cb.history[0]["scalars"].values())
    assert cb.last_result.levels["vision_encoder"].features.tokens.dtype == torch.float32
    probe_calls = [autocast for grad, autocast in calls if not grad]
    assert probe_calls and all(a == precision.endswith("-mixed") for a in probe_calls)


# -------------------------------------------------------------------- distributed
def test_ddp_two_processes_only_rank_zero_analyses(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from lightning.pytorch import Trainer, seed_everything
        from lightning.pytorch.loggers import TensorBoardLogger
        from test_callback import TinyModule, _callback

        if __name__ == "__main__":
            seed_everything(0, verbose=False)
            cb = _callback()
            trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_train_batches=1,
                              logger=TensorBoardLogger({str(tmp_path)!r}, name="tb"), callbacks=[cb],
                              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
            trainer.fit(TinyModule())
            out = {{"steps": [h["step"] for h in cb.history], "analysed": cb.last_result is not None}}
            with open({str(tmp_path)!r} + f"/rank{{trainer.global_rank}}.json", "w") as f:
                json.dump(out, f)
    """))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0 == {"steps": [1, 2], "analysed": True}
    assert rank1 == {"steps": [], "analysed": False}
    event_dirs = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    assert len(event_dirs) == 1
    acc = _events(str(event_dirs.pop()))
    assert [e.step for e in acc.Scalars("panoviz/resampled/overlap_cosine")] == [1, 2]  # written once per firing
    assert [e.step for e in acc.Images("panoviz/original_views")] == [1]


@pytest.mark.parametrize(("strategy", "rank", "forward", "analysed"), [
    ("ddp", 0, True, True), ("ddp", 1, False, False),  # DDP: the other ranks do nothing at all
    ("fsdp", 0, True, True), ("fsdp", 1, True, False),  # sharded: every rank joins the forward
    ("model_parallel", 1, True, False),
])
def test_distributed_roles(strategy, rank, forward, analysed):
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    strategies = {"ddp": DDPStrategy, "fsdp": FSDPStrategy, "model_parallel": ModelParallelStrategy}
    model = TinyModule()
    calls: list[int] = []
    model.vision_encoder.register_forward_hook(lambda *_: calls.append(1))
    trainer = SimpleNamespace(global_step=3, current_epoch=0, is_global_zero=rank == 0, loggers=[],
                              strategy=strategies[strategy](), precision_plugin=Precision())
    cb = _callback(log_images=False)
    cb._views = cb._cut_probe()
    cb._fire(trainer, model)
    assert bool(calls) == forward and bool(cb.history) == analysed


def test_validate_alone_does_not_fire(tmp_path):
    cb = _callback(on="validation_epoch_end")
    trainer = Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, callbacks=[cb],
                      limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.validate(TinyModule(with_val=True))
    assert cb.history == [] and _panoviz_warnings(record) == []


# ------------------------------------------------------------------ checkpoints
def test_resume_and_weights_only_checkpoint(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    cb = _callback()
    _fit(tmp_path, [cb, ModelCheckpoint(dirpath=ckpt_dir, save_last=True)], max_epochs=2)
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    state = ckpt["callbacks"][cb.state_key]
    assert set(state) == {"version", "module_class", "encoder_path", "resampler_path", "vision_stage", "precision",
                          "probe",
                          "settings", "pca_states", "history"}
    assert state["precision"] == "32-true"
    assert state["module_class"] == f"{TinyModule.__module__}:TinyModule"
    assert (state["encoder_path"], state["resampler_path"]) == ("vision_encoder", "resampler")
    assert state["probe"]["kind"] == "tensor" and state["probe"]["pixels"].dtype == torch.uint8
    assert state["settings"]["crop_strategy"] == "e2p" and state["settings"]["image_size"] == _SIZE
    assert state["settings"]["crop_options"]["patch_size"] == _PATCH
    assert [h["step"] for h in state["history"]] == [2, 4]
    assert set(state["pca_states"]) == {"vision_encoder", "resampled"}

    fresh = _callback()
    fresh.load_state_dict(state)
    for level, saved in state["pca_states"].items():
        assert torch.equal(fresh._analyzer.pca_states[level].basis, saved["basis"])

    resumed = _callback()
    _fit(tmp_path, [resumed, ModelCheckpoint(dirpath=ckpt_dir, save_last=True)], max_epochs=3,
         ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert [h["step"] for h in resumed.history] == [2, 4, 6]
    assert resumed.history[:2] == cb.history


def test_synthetic_probe_spec():
    from panoviz_callback.callback import _load_probe

    cb = PanoVizCallback()
    pano, spec = _load_probe(None)
    assert spec == {"kind": "synthetic", "height": 512, "seed": 0}
    assert pano.shape == (3, 512, 1024)
    assert cb.state_dict()["probe"] is None  # nothing loaded before setup


# ------------------------------------------------------------------------ faults
def _raise(pixels: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("encoder exploded")


def _panoviz_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "skipped the probe analysis" in str(w.message)]


def test_fault_encoder_raising_warns_once(tmp_path):
    cb = _callback(encoder=_raise, strict=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, model = _fit(tmp_path, [cb], max_epochs=3, logger=False)
    messages = _panoviz_warnings(record)
    assert len(messages) == 1 and "RuntimeError: encoder exploded" in messages[0]
    assert "global step 2" in messages[0]
    assert trainer.state.finished and model.steps == 6 and cb.history == []


class _NaNOnce(nn.Module):
    """Encoder whose first forward returns NaN tokens."""

    def __init__(self, model: TinyModule) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        tokens = self.model.vision_encoder(pixel_values=pixels).last_hidden_state
        return tokens * float("nan") if self.calls == 1 else tokens


def test_fault_nan_feature_then_recovers(tmp_path):
    model = TinyModule()
    cb = _callback(encoder=_NaNOnce(model), strict=False, log_images=False)
    with pytest.warns(UserWarning, match=r"skipped the probe analysis at global step 2: .*NaN") as record:
        _fit(tmp_path, [cb], model=model, max_epochs=2, logger=False)
    assert len(_panoviz_warnings(record)) == 1
    assert [h["step"] for h in cb.history] == [4]  # the next firing tried again
    assert all(torch.isfinite(s.basis).all() for s in cb._analyzer.pca_states.values())


def test_fault_strict_raises(tmp_path):
    with pytest.raises(RuntimeError, match="encoder exploded"):
        _fit(tmp_path, [_callback(encoder=_raise, strict=True)], logger=False)


def test_fault_missing_attribute_warns(tmp_path):
    cb = _callback(encoder="model.vision_encoder", strict=False)
    with pytest.warns(UserWarning, match=r"`TinyModule` has no attribute `model.vision_encoder`") as record:
        trainer, _ = _fit(tmp_path, [cb], logger=False)
    assert len(_panoviz_warnings(record)) == 1 and trainer.state.finished


def test_fault_bad_probe_fails_in_setup(tmp_path):
    model = TinyModule()
    with pytest.raises(PanoramaError, match=r"could not read its probe: .*missing\.jpg"):
        _fit(tmp_path, [_callback(probe=str(tmp_path / "missing.jpg"))], model=model, logger=False)
    assert model.steps == 0
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(PanoramaError, match=r"could not read its probe: .*bad\.jpg"):
        _fit(tmp_path, [_callback(probe=str(bad))], model=model, logger=False)
    assert model.steps == 0


# ---------------------------------------------------------------------- schedules
def test_schedule_steps_and_epochs(tmp_path):
    cb = _callback(every_n_train_steps=2, every_n_epochs=1, log_images=False)
    _fit(tmp_path, [cb], model=TinyModule(num_images=12), max_epochs=2, limit_train_batches=3, logger=False)
    assert [h["step"] for h in cb.history] == [2, 3, 4, 6]  # step 6 is both; it fires once
    assert [h["epoch"] for h in cb.history] == [0, 0, 1, 1]


def test_schedule_validation_epoch_end_skips_sanity_check(tmp_path):
    cb = _callback(on="validation_epoch_end", every_n_epochs=2, log_images=False)
    _fit(tmp_path, [cb], model=TinyModule(with_val=True), max_epochs=4, num_sanity_val_steps=1, logger=False)
    assert [h["step"] for h in cb.history] == [4, 8]


def test_save_dir_writes_figures_and_reports(tmp_path):
    cb = _callback(save_dir=str(tmp_path / "viz"))
    _fit(tmp_path, [cb], max_epochs=1, logger=False)
    names = sorted(p.name for p in (tmp_path / "viz").iterdir())
    assert names == sorted([f"{stem}_step00000002.{ext}" for stem, ext in (
        ("original_views", "png"), ("vision_encoder_pca", "png"), ("resampled_features_pca", "png"),
        ("similarity_analysis", "txt"), ("similarity", "json"))] + ["timeline.png"])
    data = json.loads((tmp_path / "viz" / "similarity_step00000002.json").read_text())
    assert (data["step"], data["epoch"], data["settings"]["crop_strategy"]) == (2, 0, "e2p")
    assert data["probe"] == "tensor" and data["settings"]["image_size"] == _SIZE
    mean = data["levels"]["resampled"]["metrics"]["overlap_cosine"]["mean"]
    assert mean == pytest.approx(cb.history[0]["scalars"]["resampled/overlap_cosine"])
