"""Panoramas: load equirectangular images from disk, or render the built-in probe scene.

:func:`load_panorama` turns any JPEG/PNG/WebP/TIFF file into a ``(3, H, W)`` float32
tensor in ``[0, 1]`` and reports every failure as a :class:`PanoramaError` that names
the file and the reason. :func:`synthetic_panorama` ray-traces a small room, so the
package has a probe image (and the tests a scene with known geometry) without any file.

Convention:
    Equirectangular as in ``docs/DESIGN.md``: row 0 is the top (up), column ``x``
    has longitude ``((x + 0.5) / W - 0.5) * 360`` degrees (0 at the image centre,
    growing to the right), row ``y`` has latitude ``(0.5 - (y + 0.5) / H) * 180``.
    World frame: x right, y up, z forward (the direction of longitude 0).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, UnidentifiedImageError
from torch import Tensor

from panoviz_callback._checks import _check_range

__all__ = ["PanoramaError", "load_panorama", "synthetic_panorama"]

# Largest panorama accepted without Pillow's decompression-bomb warning (32768 x 16384).
_MAX_PANORAMA_PIXELS = 32768 * 16384
_PIL_LOCK = threading.RLock()
_ASPECT_TOLERANCE = 0.01


class PanoramaError(ValueError):
    """A panorama file could not be loaded; the message names the path and the reason."""


# --------------------------------------------------------------------------- loading


def load_panorama(
    path: str | os.PathLike[str], max_width: int | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Load an equirectangular panorama as a float32 tensor in ``[0, 1]``.

    JPEG, PNG, WebP and TIFF files (anything Pillow reads) in 8 or 16 bits per channel;
    grayscale and palette images become RGB, an alpha channel is dropped, the EXIF
    orientation tag is ignored (panoramas are stored unrotated). 16-bit files keep
    their precision (value / 65535). The pixels reach ``device`` as uint8 (or int32 for
    16-bit data) and are converted to float there.

    Args:
        path: the image file.
        max_width: downscale (antialiased) to at most this width, keeping the aspect
            ratio; never upscales. JPEGs are decoded directly at a reduced scale, so a
            16384 x 8192 file with ``max_width=4096`` needs far less memory than the full
            image.
        device: where the tensor lives (default: CPU).

    Returns:
        The panorama of shape ``(3, H, W)``.

    Raises:
        PanoramaError: missing file, a directory, an empty, unreadable, truncated or
            zero-size image, or more than 2 x 32768 x 16384 pixels.
        TypeError: ``path`` is not a path or ``max_width`` not an int.
        ValueError: ``max_width < 1``.

    Warns:
        UserWarning: the aspect ratio is not 2:1 (the panorama is used as it is).

    Example:
        >>> pano = load_panorama("room.jpg", max_width=2048)  # doctest: +SKIP
        >>> pano.shape  # doctest: +SKIP
        torch.Size([3, 1024, 2048])
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Expected `path` to be a str or os.PathLike, got {type(path).__name__}.")
    if max_width is not None:
        if isinstance(max_width, bool) or not isinstance(max_width, int):
            raise TypeError(f"Expected `max_width` to be an int or None, got {type(max_width).__name__}.")
        _check_range(max_width, "max_width", 1)
    path = os.fspath(path)
    _check_file(path)
    device = torch.device("cpu") if device is None else torch.device(device)
    with _pillow_settings():
        try:
            pixels, scale, full_size = _decode(path, max_width)
        except PanoramaError:
            raise
        except Image.DecompressionBombError as exc:
            raise _error(path, f"the image is too large ({exc})") from exc
        except MemoryError as exc:
            raise _error(path, "not enough memory to decode it; pass a smaller `max_width`") from exc
        except Exception as exc:  # any decoder failure: report the file, never a bare PIL traceback
            raise _error(path, _reason(exc, path)) from exc
    pano = _to_tensor(pixels, scale, device)
    if max_width is not None and pano.shape[-1] > max_width:
        pano = _resize(pano, _target_size(pano.shape[-1], pano.shape[-2], max_width))
    width, height = full_size
    if abs(width / height / 2.0 - 1.0) > _ASPECT_TOLERANCE:
        warnings.warn(
            f"panorama is {width / height:.2f}:1, expected 2:1 (equirectangular): '{path}' is {width}x{height}; "
            "using it as it is.",
            stacklevel=2,
        )
    return pano


def _error(path: str, reason: str) -> PanoramaError:
    return PanoramaError(f"Cannot load panorama '{path}': {reason}.")


def _check_file(path: str) -> None:
    if os.path.isdir(path):
        raise _error(path, "it is a directory, not an image file")
    if not os.path.exists(path):
        raise _error(path, "file not found")
    if not os.access(path, os.R_OK):
        raise _error(path, "permission denied")
    if os.path.getsize(path) == 0:
        raise _error(path, "the file is empty (0 bytes)")


def _reason(exc: Exception, path: str) -> str:
    text = str(exc).rstrip(".") or type(exc).__name__
    if isinstance(exc, UnidentifiedImageError):
        size = _png_header_size(path)
        if size is not None and min(size) == 0:
            return f"the image has zero size ({size[0]}x{size[1]})"
        return "not a recognised image (JPEG, PNG, WebP, TIFF, ...)"
    if "truncated" in text or isinstance(exc, (EOFError, SyntaxError)):
        return f"the image data is truncated or corrupt ({text})"
    return f"the image data cannot be decoded ({type(exc).__name__}: {text})"


def _png_header_size(path: str) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR chunk (Pillow refuses to open a zero-size PNG at all)."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@contextlib.contextmanager
def _pillow_settings() -> Iterator[None]:
    """Let legitimate large panoramas through and refuse truncated files, then restore Pillow's globals."""
    with _PIL_LOCK:
        old_max, old_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        if old_max is not None:
            Image.MAX_IMAGE_PIXELS = max(old_max, _MAX_PANORAMA_PIXELS)
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old_max, old_truncated


def _target_size(width: int, height: int, max_width: int | None) -> tuple[int, int]:
    if max_width is None or width <= max_width:
        return width, height
    return max_width, max(1, round(height * max_width / width))


def _decode(path: str, max_width: int | None) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Decode (and shrink) the first frame: ``(pixels (h, w, C) with C in {1, 3}, value scale, full (W, H))``."""
    with Image.open(path) as im:
        full_size = im.size
        if min(full_size) <= 0:
            raise _error(path, f"the image has zero size ({full_size[0]}x{full_size[1]})")
        target = _target_size(*full_size, max_width)
        if _is_wide_rgb(im):
            return _decode_wide_rgb(path, target), 1.0 / 65535.0, full_size
        if target != full_size:
            im.draft(None, target)  # JPEG: decode at 1/2, 1/4 or 1/8 scale, still >= target
        im.load()
        if im.mode.startswith("I;16") or im.mode in ("I", "F"):
            return _wide_gray(im, target), (1.0 if im.mode == "F" else 1.0 / 65535.0), full_size
        im = _to_8bit(im)
        if im.size != target:
            im = im.resize(target, Image.Resampling.LANCZOS, reducing_gap=2.0)
        pixels = np.array(im, dtype=np.uint8)
    return pixels.reshape(pixels.shape[0], pixels.shape[1], -1), 1.0 / 255.0, full_size


def _to_8bit(im: Image.Image) -> Image.Image:
    if im.mode in ("L", "RGB"):
        return im
    if im.mode in ("1", "LA", "La"):
        return im.convert("L")  # drops alpha
    return im.convert("RGB")  # palette, RGBA (alpha dropped, not composited), CMYK, YCbCr, ...


def _wide_gray(im: Image.Image, target: tuple[int, int]) -> np.ndarray:
    if im.mode != "F":
        im = im.convert("I")  # int32: Pillow resizes no 16-bit mode
    if im.size != target:
        im = im.resize(target, Image.Resampling.LANCZOS, reducing_gap=2.0)
    return np.array(im)[:, :, None]


# Pillow unpacks 16-bit RGB(A) to 8 bits (the high byte). Decoding twice, once with the
# byte order swapped, yields the low byte too; both passes run Pillow's own decoder.
_RAW16 = re.compile(r"^(RGB|RGBA|LA);16([BLN])$")
_SWAP = {"B": "L", "L": "B", "N": "B" if sys.byteorder == "little" else "L"}


def _tile_rawmode(tile: Any) -> str | None:
    args = tile[3]
    rawmode = args[0] if isinstance(args, tuple) and args else args
    return rawmode if isinstance(rawmode, str) else None


def _is_wide_rgb(im: Image.Image) -> bool:
    rawmodes = [_tile_rawmode(t) for t in im.tile]
    return im.mode in ("RGB", "RGBA") and bool(rawmodes) and all(r and _RAW16.match(r) for r in rawmodes)


def _swap_byte_order(im: Image.Image) -> None:
    tiles = []
    for tile in im.tile:
        rawmode = _tile_rawmode(tile)
        match = _RAW16.match(rawmode or "")
        assert match is not None  # checked by _is_wide_rgb
        swapped = f"{match.group(1)};16{_SWAP[match.group(2)]}"
        args = (swapped, *tile[3][1:]) if isinstance(tile[3], tuple) else swapped
        tiles.append(tile._replace(args=args) if hasattr(tile, "_replace") else (*tile[:3], args))
    im.tile = tiles


def _decode_wide_rgb(path: str, target: tuple[int, int]) -> np.ndarray:
    """16-bit RGB(A) as int32 ``(h, w, 3)``: low byte first, then the high byte added strip by strip."""
    with Image.open(path) as im:
        _swap_byte_order(im)
        im.load()
        pixels = np.asarray(im.convert("RGB")).astype(np.int32)  # (H, W, 3) low bytes
    with Image.open(path) as im:
        im.load()
        im = im.convert("RGB")
        for y0 in range(0, im.height, 512):
            strip = np.asarray(im.crop((0, y0, im.width, min(y0 + 512, im.height))))
            pixels[y0:y0 + strip.shape[0]] += strip.astype(np.int32) << 8
    if (pixels.shape[1], pixels.shape[0]) != target:
        factor = pixels.shape[1] // target[0]
        if factor >= 2:
            pixels = _box_reduce(pixels, factor)
    return pixels


def _box_reduce(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor x factor`` blocks (partial blocks at the edges too), strip by strip, to float32."""
    height, width, channels = pixels.shape
    starts = np.arange(0, width, factor)
    counts_x = np.diff(np.append(starts, width)).astype(np.float32)
    rows = []
    for y0 in range(0, height, factor * 64):
        strip = pixels[y0:y0 + factor * 64].astype(np.float32)
        row_starts = np.arange(0, strip.shape[0], factor)
        counts_y = np.diff(np.append(row_starts, strip.shape[0])).astype(np.float32)
        summed = np.add.reduceat(np.add.reduceat(strip, row_starts, axis=0), starts, axis=1)
        rows.append(summed / (counts_y[:, None, None] * counts_x[None, :, None]))
    return np.concatenate(rows, axis=0).reshape(-1, len(starts), channels)


def _to_tensor(pixels: np.ndarray, scale: float, device: torch.device) -> Tensor:
    """``(h, w, C)`` integer or float pixels -> ``(3, h, w)`` float32 in [0, 1], converted on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)  # integers travel before the float copy
    x = x.permute(2, 0, 1).float().mul_(scale)  # (C, h, w)
    if pixels.dtype != np.uint8:
        x = x.clamp_(0.0, 1.0)
    return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x.contiguous()


def _resize(pano: Tensor, size: tuple[int, int]) -> Tensor:
    out = F.interpolate(pano[None], size=(size[1], size[0]), mode="bilinear", align_corners=False, antialias=True)
    return out[0].clamp_(0.0, 1.0)
