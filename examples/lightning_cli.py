"""Train the reference VICReg vision stage with ``LightningCLI`` and ``PanoVizCallback`` from YAML.

Usage::

    python examples/lightning_cli.py fit --config examples/config.yaml
    python examples/lightning_cli.py fit --config examples/config.yaml --trainer.max_epochs=2
    tensorboard --logdir runs/vicreg_cli --samples_per_plugin images=100

The callback is configured under ``trainer.callbacks`` with ``class_path`` / ``init_args``
(see ``examples/config.yaml``). The data module's crop settings are linked to the
model's, so they are given once, under ``model``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningCLI

from panoviz_callback.models import PanoDataModule, PanoVisionModule


class PanoCLI(LightningCLI):
    """``LightningCLI`` whose data module cuts views exactly like the model expects."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        for name in ("crop_strategy", "image_size", "crop_options"):
            parser.link_arguments(f"model.{name}", f"data.{name}")


def main(args: Any = None, run: bool = True) -> PanoCLI:
    """Run the CLI (``args=None`` reads ``sys.argv``); ``run=False`` only instantiates."""
    return PanoCLI(PanoVisionModule, PanoDataModule, args=args, run=run, seed_everything_default=0,
                   save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
