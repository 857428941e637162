"""Train the reference VICReg vision stage on panoramas and watch it learn with ``PanoVizCallback``.

The encoder (a small random SigLIP by default, frozen) stays fixed; the resampler and the
VICReg projector learn to make overlapping views agree. The callback logs, once per epoch,
the PCA maps of a fixed probe panorama and the cross-view metrics: with VICReg,
``panoviz/resampled/overlap_cosine`` climbs while the frozen encoder's stays flat.

Usage::

    python examples/train_vicreg.py                          # synthetic panoramas, TensorBoard
    python examples/train_vicreg.py --data DIR --wandb offline
    python examples/train_vicreg.py --resampler qformer --inside   # + attention maps, layer sweep, agreement
    tensorboard --logdir runs/vicreg --samples_per_plugin images=100

Everything a run writes (TensorBoard logs, the W&B run folder, checkpoints) lands under
``--default_root_dir``. The defaults finish in a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

_CROP_STRATEGIES = ("e2p", "anyres_e2p", "cubemap", "sliding_window")
_RESAMPLERS = ("identity", "mlp", "qformer", "perceiver")


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (Trainer flags use Lightning's names)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="folder of panoramas (default: synthetic panoramas)")
    p.add_argument("--num_synthetic", type=int, default=64, help="synthetic training panoramas")
    p.add_argument("--synthetic_height", type=int, default=224, help="height of the synthetic panoramas")
    p.add_argument("--probe", default=None, help="probe panorama for the callback (default: the built-in one)")
    p.add_argument("--max_epochs", type=int, default=6)
    p.add_argument("--default_root_dir", default="runs/vicreg")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="auto", help="'auto', a count, or a comma-separated list of ids")
    p.add_argument("--strategy", default="auto")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--wandb", choices=("offline", "online"), default=None, help="also log to Weights & Biases")
    p.add_argument("--wandb_project", default="panoviz")
    p.add_argument("--no_callback", action="store_true", help="train without PanoVizCallback")
    p.add_argument("--every_n_epochs", type=int, default=1, help="how often the callback fires")
    p.add_argument("--inside", action="store_true", help="the callback also logs attention maps (with "
                   "--resampler qformer/perceiver: per query), the layer sweep and the agreement panorama")
    p.add_argument("--vision_name", default="tiny", help="encoder: 'tiny', a local folder or a cached hub name")
    p.add_argument("--patch_size", type=int, default=8, help="patch size of the 'tiny' encoder")
    p.add_argument("--image_size", type=int, default=112, help="view size S")
    p.add_argument("--crop_strategy", choices=_CROP_STRATEGIES, default="e2p")
    p.add_argument("--resampler", choices=_RESAMPLERS, default="mlp")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num_workers", type=int, default=0)
    return p


def _devices(value: str) -> Any:
    if value == "auto":
        return value
    if "," in value:
        return [int(v) for v in value.split(",") if v]
    return int(value)


def build(args: argparse.Namespace) -> tuple[Any, Any, Any, dict[str, Any]]:
    """``(model, datamodule, trainer, handles)`` for the parsed flags; ``handles`` names the loggers/callbacks."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from panoviz_callback import PanoVizCallback
    from panoviz_callback.models import PanoDataModule, PanoVisionModule

    root = Path(args.default_root_dir)
    overrides = {"image_size": args.image_size}
    if args.vision_name == "tiny":
        overrides["patch_size"] = args.patch_size
    crop = {"crop_strategy": args.crop_strategy, "image_size": args.image_size,
            "crop_options": {"patch_size": args.patch_size}}
    model = PanoVisionModule(vision_name=args.vision_name, vision_overrides=overrides,
                             resampler_type=args.resampler, lr=args.lr, **crop)
    data = PanoDataModule(data_dir=args.data, num_synthetic=args.num_synthetic, batch_size=args.batch_size,
                          synthetic_height=args.synthetic_height,
                          num_workers=args.num_workers, seed=args.seed, **crop)
    handles: dict[str, Any] = {"tensorboard": TensorBoardLogger(root, name="tensorboard", default_hp_metric=False),
                               "checkpoint": ModelCheckpoint(dirpath=root / "checkpoints", filename="{epoch}",
                                                             save_top_k=-1, save_last=True)}
    loggers = [handles["tensorboard"]]
    if args.wandb:
        from lightning.pytorch.loggers import WandbLogger

        handles["wandb"] = WandbLogger(save_dir=str(root), offline=args.wandb == "offline", project=args.wandb_project)
        loggers.append(handles["wandb"])
    callbacks = [handles["checkpoint"]]
    if not args.no_callback:
        handles["panoviz"] = PanoVizCallback(probe=args.probe, every_n_epochs=args.every_n_epochs,
                                             inside=True if args.inside else None, **crop)
        callbacks.insert(0, handles["panoviz"])
    trainer = Trainer(default_root_dir=root, max_epochs=args.max_epochs, accelerator=args.accelerator,
                      devices=_devices(args.devices), strategy=args.strategy, precision=args.precision,
                      logger=loggers, callbacks=callbacks, log_every_n_steps=1)
    return model, data, trainer, handles


def _summary(trainer: Any, handles: dict[str, Any]) -> str:
    root = Path(trainer.default_root_dir)
    lines = ["", f"TensorBoard logs: {handles['tensorboard'].log_dir}",
             f"Last checkpoint:  {handles['checkpoint'].last_model_path or '(none written)'}"]
    if "wandb" in handles:
        lines.append(f"W&B run folder:   {handles['wandb'].experiment.dir}")
    history = getattr(handles.get("panoviz"), "history", [])
    key = "resampled/overlap_cosine"
    if len(history) >= 2 and key in history[0]["scalars"] and key in history[-1]["scalars"]:
        first, last = history[0]["scalars"][key], history[-1]["scalars"][key]
        lines.append(f"panoviz/{key}: {first:.4f} (epoch {history[0]['epoch']}) -> {last:.4f} "
                     f"(epoch {history[-1]['epoch']})")
    lines.append(f"Open TensorBoard:  tensorboard --logdir {root} --samples_per_plugin images=100")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, train, and print where the logs and ``last.ckpt`` are."""
    args = build_parser().parse_args(argv)
    from lightning.pytorch import seed_everything

    seed_everything(args.seed, verbose=False)
    model, data, trainer, handles = build(args)
    trainer.fit(model, datamodule=data)
    if trainer.is_global_zero:
        print(_summary(trainer, handles))
    if "wandb" in handles:
        import wandb

        wandb.finish()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
