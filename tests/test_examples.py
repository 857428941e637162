"""The examples run as a user runs them: the script, its flags and files, the VICReg effect, LightningCLI."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
_TINY = ["--max_epochs", "2", "--num_synthetic", "2", "--batch_size", "2", "--image_size", "32",
         "--accelerator", "cpu", "--devices", "1"]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scalars(root: Path, tag: str) -> list[tuple[int, float]]:
    (event_dir,) = {p.parent for p in root.rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_train_vicreg_script_tiny(tmp_path):
    root = tmp_path / "run"
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline", "WANDB_CONSOLE": "off"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "train_vicreg.py"), *_TINY, "--default_root_dir", str(root),
                           "--wandb", "offline"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (root / "checkpoints" / "last.ckpt").is_file()
    assert f"Last checkpoint:  {root / 'checkpoints' / 'last.ckpt'}" in proc.stdout
    assert f"tensorboard --logdir {root} --samples_per_plugin images=100" in proc.stdout
    assert "TensorBoard logs:" in proc.stdout and "panoviz/resampled/overlap_cosine:" in proc.stdout
    assert len(_scalars(root / "tensorboard", "panoviz/resampled/overlap_cosine")) == 2
    run_dirs = list((root / "wandb").glob("offline-run-*"))  # the W&B run folder is under --default_root_dir too
    assert len(run_dirs) == 1 and list(run_dirs[0].rglob("*.png"))
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "lightning_logs").exists()


def test_train_vicreg_no_callback(tmp_path, capsys):
    example = _load("train_vicreg")
    assert example.main([*_TINY, "--max_epochs", "1", "--default_root_dir", str(tmp_path), "--no_callback"]) == 0
    assert _scalars(tmp_path / "tensorboard", "panoviz/resampled/overlap_cosine") == []
    assert _scalars(tmp_path / "tensorboard", "train/loss")
    assert "Last checkpoint:" in capsys.readouterr().out


def test_vicreg_effect_overlap_cosine_rises(tmp_path):
    """The example's default model and callback show the VICReg effect (fewer panoramas: it runs in CI)."""
    example = _load("train_vicreg")
    example.main(["--default_root_dir", str(tmp_path), "--accelerator", "cpu", "--devices", "1",
                  "--num_synthetic", "16", "--max_epochs", "2"])
    encoder = [v for _, v in _scalars(tmp_path / "tensorboard", "panoviz/vision_encoder/overlap_cosine")]
    resampled = [v for _, v in _scalars(tmp_path / "tensorboard", "panoviz/resampled/overlap_cosine")]
    assert len(resampled) == 2
    assert resampled[-1] > resampled[0] + 0.02, resampled
    assert encoder[-1] == pytest.approx(encoder[0], abs=1e-6)  # the frozen encoder does not move


def _config(tmp_path: Path) -> Path:
    config = yaml.safe_load((EXAMPLES / "config.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(default_root_dir=str(tmp_path), max_epochs=1, accelerator="cpu", devices=1,
                   enable_progress_bar=False, limit_train_batches=1)
    trainer["logger"][0]["init_args"]["save_dir"] = str(tmp_path)
    trainer["callbacks"][1]["init_args"]["dirpath"] = str(tmp_path / "checkpoints")
    config["data"].update(num_synthetic=2, batch_size=2)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_lightning_cli_from_yaml(tmp_path, monkeypatch):
    from panoviz_callback import PanoVizCallback

    monkeypatch.setattr(sys, "argv", ["lightning_cli.py"])
    cli_module = _load("lightning_cli")
    cli = cli_module.main(["--config", str(EXAMPLES / "config.yaml"), "--trainer.max_epochs=1"], run=False)
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, PanoVizCallback)]
    assert (cb.crop_strategy, cb.image_size, cb.crop_options) == ("e2p", 64, {"patch_size": 8})
    assert cli.trainer.max_epochs == 1
    assert cli.datamodule.hparams.crop_strategy == cli.model.hparams.crop_strategy  # linked

    cli = cli_module.main(["fit", "--config", str(_config(tmp_path))])
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, PanoVizCallback)]
    assert [h["step"] for h in cb.history] == [1]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert len(_scalars(tmp_path / "tensorboard", "panoviz/vision_encoder/overlap_cosine")) == 1


@pytest.mark.parametrize("flags", [["--no_callback"], []])
def test_train_vicreg_parser(flags):
    args = _load("train_vicreg").build_parser().parse_args(flags)
    assert args.no_callback == bool(flags) and args.wandb is None and args.crop_strategy == "e2p"
