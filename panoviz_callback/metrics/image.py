"""Image metrics of the PCA maps of view pairs: SSIM and LPIPS."""

from __future__ import annotations

import math
import os
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from panoviz_callback._checks import _check_choice, _check_range, _check_shape
from panoviz_callback._imports import _LPIPS_AVAILABLE, _TORCHVISION_AVAILABLE
from panoviz_callback.metrics._common import _check_mask, _check_same, _full_precision

__all__ = ["ssim", "LPIPSMetric"]


def _gaussian_window(sigma: float, device: torch.device) -> Tensor:
    radius = int(3.5 * sigma + 0.5)  # scikit-image's SSIM: truncate=3.5 -> 11 taps for sigma=1.5
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return (w / w.sum()).float().to(device)


@_full_precision
def ssim(
    img_a: Tensor, img_b: Tensor, mask: Tensor | None = None, *, data_range: float = 1.0, sigma: float = 1.5,
    erode_mask: bool = True,
) -> Tensor:
    r"""Mean structural similarity (Wang et al., 2004) per pair, batched.

    Gaussian-weighted statistics (``sigma=1.5``, an 11 x 11 window as scikit-image
    truncates it), ``K1=0.01``, ``K2=0.03``, population covariances; the SSIM map of
    every channel is averaged over channels and over the valid region, i.e. the
    pixels whose window lies inside the image (a border of ``r = 5`` px is left out).
    Without a mask this equals ``skimage.metrics.structural_similarity(a, b,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1,
    channel_axis=-1)``.

    .. math::
        \mathrm{SSIM} = \frac{(2 \mu_a \mu_b + C_1)(2 \sigma_{ab} + C_2)}
        {(\mu_a^2 + \mu_b^2 + C_1)(\sigma_a^2 + \sigma_b^2 + C_2)}

    Mask: the map is averaged over the valid pixels where ``mask`` is true. With
    ``erode_mask=True`` (default) a pixel only counts when the mask is true in its
    whole window, so no window straddles the overlap border and pixels outside the
    overlap (e.g. the zeros of a warped image) never enter the statistics; with
    ``False`` every masked pixel counts. A pair with no pixel left gives NaN.

    Args:
        img_a: ``(P, C, h, w)`` images, ``h, w >= 11``.
        img_b: ``(P, C, h, w)`` images (e.g. view j warped into view i's frame).
        mask: ``(P, h, w)`` bool, the pixels to compare, or None for all.
        data_range: value range of the images (``C1 = (0.01 R)^2``, ``C2 = (0.03 R)^2``).
        sigma: standard deviation of the Gaussian window in pixels.
        erode_mask: shrink the mask by the window radius (see above).

    Returns:
        ``(P,)`` float32, 1 for identical images.

    Example:
        >>> x = torch.linspace(0, 1, 3 * 16 * 16).reshape(1, 3, 16, 16)
        >>> ssim(x, x)
        tensor([1.])
    """
    _check_shape(img_a, "P C h w", "img_a")
    _check_shape(img_b, "P C h w", "img_b")
    _check_same(img_a, img_b, "img_a", "img_b")
    _check_range(data_range, "data_range", 0, None, low_inclusive=False)
    _check_range(sigma, "sigma", 0, None, low_inclusive=False)
    win = _gaussian_window(sigma, img_a.device)
    k, r = win.numel(), win.numel() // 2
    h, w = img_a.shape[2:]
    if h < k or w < k:
        raise ValueError(f"Expected images of at least {k} x {k} px for the SSIM window, got {h} x {w}.")
    _check_mask(mask, img_a)

    a, b = img_a.float(), img_b.float()
    valid = None  # (P, h-2r, w-2r): the valid positions that count
    if mask is not None:
        if erode_mask:
            outside = F.max_pool2d((~mask).float()[:, None], kernel_size=(k, 1), stride=1)  # separable: the same
            valid = F.max_pool2d(outside, kernel_size=(1, k), stride=1)[:, 0] == 0
        else:
            valid = mask[:, r : h - r, r : w - r]
        rows, cols = valid.any(2).any(0).nonzero()[:, 0], valid.any(1).any(0).nonzero()[:, 0]
        if len(rows) == 0:
            return torch.full((a.shape[0],), math.nan, dtype=torch.float32, device=a.device)
        # only the bounding box of the valid positions is filtered (each SSIM value depends on its window only)
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        a, b = a[..., y0 : y1 + 2 * r, x0 : x1 + 2 * r], b[..., y0 : y1 + 2 * r, x0 : x1 + 2 * r]
        valid = valid[:, y0:y1, x0:x1]
    smap = _ssim_map(a, b, win, data_range)  # (P, h', w')
    if valid is None:
        return smap.mean((1, 2))
    valid = valid.float()
    return (smap * valid).sum((1, 2)) / valid.sum((1, 2))  # 0 / 0 = NaN for an empty mask


def _ssim_map(a: Tensor, b: Tensor, win: Tensor, data_range: float) -> Tensor:
    """SSIM map averaged over channels at the valid positions: ``(P, C, h, w) -> (P, h - 2r, w - 2r)``."""
    chans, k = a.shape[1], win.numel()
    stats = torch.cat([a, b, a * a, b * b, a * b], dim=1)  # (P, 5C, h, w)
    groups = stats.shape[1]
    stats = F.conv2d(stats, win.view(1, 1, k, 1).expand(groups, 1, k, 1), groups=groups)
    stats = F.conv2d(stats, win.view(1, 1, 1, k).expand(groups, 1, 1, k), groups=groups)  # (P, 5C, h-2r, w-2r)
    mu_a, mu_b, e_aa, e_bb, e_ab = stats.split(chans, dim=1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    var_a, var_b, cov = e_aa - mu_a * mu_a, e_bb - mu_b * mu_b, e_ab - mu_a * mu_b
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return smap.mean(1)


_LPIPS_NETS = ("alex", "vgg", "squeeze")


def _backbone_checkpoint(net: str) -> str:
    """The file torchvision loads the ImageNet backbone from (``$TORCH_HOME/hub/checkpoints/...``)."""
    from torchvision import models

    weights = {
        "alex": models.AlexNet_Weights.IMAGENET1K_V1,
        "vgg": models.VGG16_Weights.IMAGENET1K_V1,
        "squeeze": models.SqueezeNet1_1_Weights.IMAGENET1K_V1,
    }[net]
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


class LPIPSMetric:
    """LPIPS distance (Zhang et al., 2018) between the images of every pair, built once.

    Lower is more similar (0 for identical images). Inputs in ``[0, 1]`` are mapped
    to ``[-1, 1]`` and upsampled (bilinear) so that the shorter side is at least
    ``min_size`` px (AlexNet needs >= 32). The network runs on the inputs' device,
    without gradients, autocast off.

    Mask: pixels outside the mask are set to mid-grey in both images, so they agree
    there, and each layer's distance map is averaged with the mask (area-resized to
    that layer's resolution) as weights. The value is thus approximately LPIPS over
    the overlap (deep receptive fields near its border still see the grey fill).
    Without a mask it is exactly ``lpips.LPIPS`` with the same network.

    Availability: the linear layers ship inside the ``lpips`` package, the ImageNet
    backbone is loaded by torchvision from ``$TORCH_HOME/hub/checkpoints`` (normally
    downloaded on first use). When the package or that file is missing, or the
    network cannot be built, nothing is downloaded: :attr:`skipped` holds the reason,
    one warning is issued and calls return None.

    Args:
        net: backbone, one of ``("alex", "vgg", "squeeze")``.
        pretrained_backbone: False builds a randomly initialised backbone (seeded, no
            download, global RNG untouched): the full code path, e.g. for tests.
        min_size: minimum length of the shorter side fed to the network.
    """

    higher_is_better = False

    def __init__(self, net: Literal["alex", "vgg", "squeeze"] = "alex", *, pretrained_backbone: bool = True,
                 min_size: int = 64) -> None:
        _check_choice(net, _LPIPS_NETS, "net")
        _check_range(min_size, "min_size", 32, None)
        self.net = net
        self.pretrained_backbone = pretrained_backbone
        self.min_size = int(min_size)
        self._model: torch.nn.Module | None = None
        self.skipped: str | None = self._build()
        if self.skipped is not None:
            warnings.warn(f"LPIPS is skipped: {self.skipped}", UserWarning, stacklevel=2)

    def _build(self) -> str | None:
        if not _LPIPS_AVAILABLE or not _TORCHVISION_AVAILABLE:
            missing = "lpips" if not _LPIPS_AVAILABLE else "torchvision"
            return f"the `{missing}` package is not installed: pip install 'panoviz_callback[lpips]'"
        if self.pretrained_backbone:
            path = _backbone_checkpoint(self.net)
            if not os.path.isfile(path):
                return (
                    f"LPIPS backbone weights ({self.net}) are not available offline: torchvision looks for {path} "
                    f"(TORCH_HOME={os.environ.get('TORCH_HOME', '<unset>')}); put the file there to enable LPIPS"
                )
        import lpips

        try:
            with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
                warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation
                torch.manual_seed(0)
                model = lpips.LPIPS(net=self.net, pretrained=True, pnet_rand=not self.pretrained_backbone,
                                    verbose=False)
        except Exception as err:  # a corrupt or foreign checkpoint must not stop the analysis
            return f"LPIPS ({self.net}) could not be built: {type(err).__name__}: {err}"
        self._model = model.eval().requires_grad_(False)
        return None

    def __call__(self, a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor | None:
        """Distances between ``a[p]`` and ``b[p]``.

        Args:
            a: ``(P, 3, h, w)`` images in ``[0, 1]``.
            b: ``(P, 3, h, w)`` images in ``[0, 1]``.
            mask: ``(P, h, w)`` bool, the pixels to compare, or None for all.

        Returns:
            ``(P,)`` float32 distances (NaN for an empty mask), or None when :attr:`skipped`.
        """
        _check_shape(a, "P 3 h w", "a")
        _check_shape(b, "P 3 h w", "b")
        _check_same(a, b, "a", "b")
        _check_mask(mask, a)
        if self._model is None:
            return None
        model = self._model.to(a.device)
        with torch.no_grad(), torch.autocast(a.device.type, enabled=False):
            x = torch.cat([a, b]).float() * 2 - 1  # (2P, 3, h, w) in [-1, 1]
            weight = None if mask is None else mask.float()[:, None]  # (P, 1, h, w)
            if weight is not None:
                x = x * weight.repeat(2, 1, 1, 1)  # mid-grey (0) outside the mask in both images
            h, w = x.shape[-2:]
            if min(h, w) < self.min_size:
                scale = self.min_size / min(h, w)
                size = (max(self.min_size, round(h * scale)), max(self.min_size, round(w * scale)))
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                if weight is not None:
                    weight = F.interpolate(weight, size=size, mode="bilinear", align_corners=False)
            import lpips

            outs = model.net(model.scaling_layer(x))
            dist = torch.zeros(a.shape[0], device=a.device)
            for layer, out in enumerate(outs):
                f0, f1 = lpips.normalize_tensor(out).chunk(2)
                layer_map = model.lins[layer]((f0 - f1) ** 2)[:, 0]  # (P, hk, wk)
                if weight is None:
                    dist += layer_map.mean((1, 2))
                else:
                    wk = F.interpolate(weight, size=layer_map.shape[-2:], mode="area")[:, 0]
                    dist += (layer_map * wk).sum((1, 2)) / wk.sum((1, 2))
        return dist
