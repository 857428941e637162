"""``PanoVisionModule``: a reference vision stage trained with VICReg on overlapping views.

A vision encoder (frozen by default, as in PanoLLaVA's vision stage), a resampler and a
VICReg projector. Each training panorama arrives cut into ``V`` views; the loss pulls the
projected tokens of adjacent views together where they see the same scene point.

Checkpoints describe themselves: every constructor argument is a plain Python value kept
in ``hyper_parameters`` (``image_size`` and ``latent_dimension`` are stored resolved), so
``PanoVisionModule.load_from_checkpoint(path)`` rebuilds the module offline and
:meth:`PanoVisionModule.build_vision_stage` rebuilds only the encoder and the resampler.
State-dict prefixes: ``vision_encoder.`` (the encoder), ``resampler.`` (the resampler),
``projector.`` (the VICReg projector, training only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from panoviz_callback._checks import _check_choice, _check_range, _check_shape
from panoviz_callback.models.resamplers import RESAMPLER_KINDS
from panoviz_callback.models.stage import PanoVisionStage, vision_config as _vision_config
from panoviz_callback.models.vicreg import PAIRINGS, VICRegOverlapLoss

__all__ = ["PanoVisionModule"]


class PanoVisionModule(pl.LightningModule):
    """Vision encoder + resampler + projector, trained with :class:`VICRegOverlapLoss`.

    Args:
        vision_name: encoder for :func:`panoviz_callback.features.load_vision_encoder`: a
            preset (``"tiny"``: a small randomly initialised SigLIP-style ViT, offline), a
            local ``save_pretrained`` folder or a cached hub name.
        vision_overrides: config overrides for the encoder, e.g. ``{"image_size": 128}``.
        resampler_type: ``"identity"``, ``"mlp"``, ``"qformer"`` or ``"perceiver"``.
        latent_dimension: resampler output size; ``None``: the encoder's hidden size.
        num_queries: ``Q`` for the query resamplers.
        resampler_depth: layers of the resampler (``None``: 3 for the MLP, 2 otherwise).
        resampler_heads: attention heads of the query resamplers (``None``: automatic).
        projector_dim: width of the VICReg projector (Linear-LayerNorm-GELU-Linear);
            ``0`` puts the loss on the resampled tokens directly.
        crop_strategy: how panoramas are cut into views (``make_views``); must match the data.
        image_size: view size ``S``; ``None``: the encoder's configured image size.
        crop_options: options of the crop strategy (``fov_deg``, ``overlap``, ...).
        sim_weight: VICReg invariance weight.
        var_weight: VICReg variance weight.
        cov_weight: VICReg covariance weight.
        pairing: ``"geometric"`` (same scene point) or ``"strip"`` (the original column strips).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        freeze_encoder: keep the encoder's weights fixed (``requires_grad=False``) and the
            encoder in ``eval`` mode, whatever ``train()`` is called with.
        trainable_last_blocks: with ``freeze_encoder``, this many of the encoder's last
            transformer blocks stay trainable (and follow ``train()``/``eval()``).

    Convention:
        Frozen parts of the encoder are put back in ``eval`` by an override of
        :meth:`train`, so every ``model.train()`` (Lightning calls it at the start of fit
        and after validation) leaves them in ``eval``: dropout and normalisation
        statistics of a frozen encoder never change, as in PanoLLaVA. Lightning notes this
        at the start of fit ("Found N module(s) in eval mode at the start of training");
        that is the frozen encoder and expected. The token pairs of the loss come from the
        crop geometry (``crop_strategy``, ``image_size``, ``crop_options``, computed once and
        cached); ``sliding_window`` windows are snapped on a ``2S x 4S`` panorama, which
        may differ from the data's snapping by less than one panorama pixel.

    Example::

        >>> model = PanoVisionModule("tiny", vision_overrides={"image_size": 64}, image_size=64)
        >>> model(torch.rand(2, 8, 3, 64, 64)).shape[:2]   # (B, V, N, D)
        torch.Size([2, 8])
    """

    encoder_attr = "vision_encoder"
    resampler_attr = "resampler"
    state_prefixes = {"vision_encoder": "vision_encoder.", "resampler": "resampler.", "projector": "projector."}

    def __init__(
        self,
        vision_name: str = "tiny",
        vision_overrides: dict[str, Any] | None = None,
        resampler_type: Literal["identity", "mlp", "qformer", "perceiver"] = "mlp",
        latent_dimension: int | None = None,
        num_queries: int = 16,
        resampler_depth: int | None = None,
        resampler_heads: int | None = None,
        projector_dim: int = 256,
        crop_strategy: str = "e2p",
        image_size: int | None = None,
        crop_options: dict[str, Any] | None = None,
        sim_weight: float = 25.0,
        var_weight: float = 25.0,
        cov_weight: float = 1.0,
        pairing: Literal["geometric", "strip"] = "geometric",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        freeze_encoder: bool = True,
        trainable_last_blocks: int = 0,
    ) -> None:
        super().__init__()
        _check_choice(resampler_type, RESAMPLER_KINDS, "resampler_type")
        _check_choice(pairing, PAIRINGS, "pairing")
        _check_range(projector_dim, "projector_dim", 0)
        _check_range(lr, "lr", 0.0, low_inclusive=False)
        _check_range(trainable_last_blocks, "trainable_last_blocks", 0)
        self.save_hyperparameters()
        self.vision_encoder, self.resampler = self.build_vision_stage(self.hparams)
        # store resolved values so the checkpoint needs no encoder to be read
        self.hparams.image_size = image_size or _encoder_image_size(self.vision_encoder)
        self.hparams.latent_dimension = self.resampler.out_dim
        self.projector = _projector(self.resampler.out_dim, projector_dim)
        self.vicreg = VICRegOverlapLoss(sim_weight, var_weight, cov_weight, pairing=pairing)
        self._freeze_encoder(freeze_encoder, trainable_last_blocks)
        self._geometry: dict[tuple, tuple[list[tuple[int, int]], dict | None]] = {}

    # ------------------------------------------------------------------ building
    @staticmethod
    def build_vision_stage(hparams: Mapping[str, Any], *, pretrained: bool = True) -> tuple[nn.Module, nn.Module]:
        """Build the encoder and the resampler (no projector) from ``hyper_parameters``.

        Missing keys take the constructor's defaults and unknown keys are ignored, so the
        ``hyper_parameters`` of a PanoLLaVA checkpoint (``vision_name``, ``resampler_type``,
        ``latent_dimension``) work too.

        Args:
            hparams: a checkpoint's ``hyper_parameters`` (or any mapping of constructor arguments).
            pretrained: load the encoder's pretrained weights (folder or cached hub name);
                ``False`` builds it from its config only, for loading a checkpoint's
                ``vision_encoder.*`` weights on top (the resampler is always random).

        Returns:
            ``(encoder, resampler)``, the encoder in ``eval`` mode.

        Example::

            >>> ckpt = torch.load("last.ckpt", weights_only=True)  # doctest: +SKIP
            >>> hp, sd = ckpt["hyper_parameters"], ckpt["state_dict"]  # doctest: +SKIP
            >>> enc, res = PanoVisionModule.build_vision_stage(hp, pretrained=False)  # doctest: +SKIP
            >>> pre = "vision_encoder."  # doctest: +SKIP
            >>> enc.load_state_dict({k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)})  # doctest: +SKIP
        """
        return PanoVisionStage.build_vision_stage(hparams, pretrained=pretrained)

    def _freeze_encoder(self, freeze: bool, last_blocks: int) -> None:
        self._trainable_blocks: list[nn.Module] = []
        if not freeze:
            return
        self.vision_encoder.requires_grad_(False)
        if last_blocks:
            blocks = _encoder_blocks(self.vision_encoder)
            if last_blocks > len(blocks):
                raise ValueError(
                    f"Argument `trainable_last_blocks` must be in [0, {len(blocks)}] for this encoder, "
                    f"got {last_blocks}."
                )
            self._trainable_blocks = list(blocks[-last_blocks:])
            for block in self._trainable_blocks:
                block.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> PanoVisionModule:
        """Set the training mode; the frozen parts of the encoder stay in ``eval`` (see Convention)."""
        super().train(mode)
        if self.hparams.get("freeze_encoder", False):
            self.vision_encoder.eval()
            for block in self._trainable_blocks:
                block.train(mode)
        return self

    # ------------------------------------------------------------------ forward
    def encode(self, pixels: Tensor) -> Tensor:
        """Encoder patch tokens of the last layer, prefix tokens dropped.

        Args:
            pixels: ``(V, 3, S, S)`` views in ``[0, 1]`` (normalised for the encoder inside).

        Returns:
            ``(V, N, D)`` tokens (no gradient when the encoder is fully frozen).
        """
        from panoviz_callback.features import extract_features

        _check_shape(pixels, "V 3 h w", "pixels")
        frozen = self.hparams.freeze_encoder and not self._trainable_blocks
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            feats = extract_features(self.vision_encoder, pixels, normalize="auto")
        self._grid_hw = feats.grid_hw
        return feats.tokens

    def forward(self, pixels: Tensor) -> Tensor:
        """Resampled tokens of every view.

        Args:
            pixels: ``(B, V, 3, S, S)`` or ``(V, 3, S, S)`` views in ``[0, 1]``.

        Returns:
            ``(B, V, N, D')`` or ``(V, N, D')``; ``N`` becomes ``Q`` for query resamplers.
        """
        _check_shape(pixels, "* 3 h w", "pixels")
        lead = pixels.shape[:-3]
        tokens = self.resampler(self.encode(pixels.reshape(-1, *pixels.shape[-3:])))  # (B * V, N, D')
        return tokens.reshape(*lead, *tokens.shape[1:])

    def _vicreg_step(self, batch: Mapping[str, Tensor], stage: str) -> Tensor:
        pixels = batch["pixels"]
        _check_shape(pixels, "B V 3 h w", "batch['pixels']")
        z = self.projector(self(pixels))  # (B, V, N, Dp)
        pairs, corr = self._pairs(pixels.shape[1], z.device)
        loss, terms = self.vicreg(z, pairs, corr)
        size = pixels.shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict({f"{stage}/{name}": value for name, value in terms.items()}, batch_size=size)
        return loss

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        """VICReg on adjacent-view token pairs; logs ``train/loss`` and the three terms."""
        return self._vicreg_step(batch, "train")

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        """The same loss on validation panoramas, logged as ``val/*``."""
        return self._vicreg_step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters."""
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # ------------------------------------------------------------------ geometry
    def _views_geometry(self) -> Any:
        """The :class:`~panoviz_callback.views.ViewSet` of this module's crop settings (black pixels)."""
        from panoviz_callback.views import make_views

        s = self.hparams.image_size
        blank = torch.zeros(3, 2 * s, 4 * s)
        return make_views(blank, self.hparams.crop_strategy, s, **(self.hparams.crop_options or {}))

    def _pairs(self, num_views: int, device: torch.device) -> tuple[list[tuple[int, int]], dict | None]:
        grid_hw = self._grid_hw if self.resampler.output_layout == "grid" else None
        key = (num_views, grid_hw, str(device))
        if key not in self._geometry:
            views = self._views_geometry()
            if len(views) != num_views:
                raise ValueError(
                    f"The batch holds {num_views} views per panorama but crop_strategy="
                    f"{self.hparams.crop_strategy!r} with {self.hparams.crop_options} gives {len(views)}: "
                    "give the data module the same crop settings as the model."
                )
            pairs = [tuple(p) for p in views.pairs]
            corr = None
            if grid_hw is not None:
                pairs_idx = self.vicreg.correspondences(views, grid_hw)
                corr = {p: (a.to(device), b.to(device)) for p, (a, b) in pairs_idx.items()}
            self._geometry[key] = (pairs, corr)
        return self._geometry[key]

    def setup(self, stage: str) -> None:
        """Check that a :class:`PanoDataModule` cuts views the way this module expects."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        hp = getattr(dm, "hparams", None)
        if hp is None or "crop_strategy" not in hp:
            return
        mine = (self.hparams.crop_strategy, self.hparams.image_size, _plain(self.hparams.crop_options or {}))
        theirs = (hp["crop_strategy"], hp["image_size"], _plain(hp.get("crop_options") or {}))
        if mine != theirs:
            raise ValueError(
                f"The data module cuts views with (crop_strategy, image_size, crop_options)={theirs} but the "
                f"model expects {mine}: give both the same crop settings."
            )


def _plain(value: Any) -> Any:
    """Tuples as lists, mappings as dicts (YAML and Python spellings of one setting compare equal)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _projector(dim: int, width: int) -> nn.Module:
    if width == 0:
        return nn.Identity()
    return nn.Sequential(nn.Linear(dim, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, width))


def _encoder_image_size(encoder: nn.Module) -> int:
    size = getattr(_vision_config(encoder), "image_size", None)
    if size is None:
        raise ValueError("The encoder's config has no `image_size`: give `image_size` explicitly.")
    return int(size if isinstance(size, int) else size[0])


def _encoder_blocks(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's transformer blocks: its longest ``nn.ModuleList``."""
    lists = [m for m in encoder.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError("Cannot find the encoder's blocks (no nn.ModuleList): use `trainable_last_blocks=0`.")
    return max(lists, key=len)

