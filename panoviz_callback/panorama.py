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
import os
import re
import struct
import sys
import threading
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torch import Tensor

from panoviz_callback._checks import _check_range
from panoviz_callback.synthetic import synthetic_panorama  # re-exported: the probe scene lives beside the loader

__all__ = ["IMAGE_SUFFIXES", "PanoramaError", "load_panorama", "synthetic_panorama"]

#: File suffixes taken as panoramas when a folder or a glob pattern is listed (the runner, ``PanoDataModule``).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff")

# Largest panorama accepted without Pillow's decompression-bomb warning (32768 x 16384).
_MAX_PANORAMA_PIXELS = 32768 * 16384
_PIL_LOCK = threading.RLock()
_ASPECT_TOLERANCE = 0.01  # relative; and never for one pixel off


class PanoramaError(ValueError):
    """A panorama file could not be loaded; the message names the path and the reason."""


# --------------------------------------------------------------------------- loading


def load_panorama(
    path: str | os.PathLike[str], max_width: int | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Load an equirectangular panorama as a float32 tensor in ``[0, 1]``.

    JPEG, PNG, WebP and TIFF files (anything Pillow reads) in 8 or 16 bits per channel;
    grayscale and palette images become RGB, an alpha channel is dropped (not composited),
    the EXIF orientation tag is ignored (panoramas are stored unrotated). 16-bit files keep
    their precision (value / 65535). The pixels travel to ``device`` as integers and are
    converted to float there (16-bit RGB shrunk by ``max_width`` is averaged on the CPU).
    Pillow's ``MAX_IMAGE_PIXELS`` (raised to at least 32768 x 16384) and
    ``LOAD_TRUNCATED_IMAGES`` (off) are set for the call only and restored.

    Args:
        path: the image file.
        max_width: downscale (antialiased, Lanczos) to at most this width, keeping the
            aspect ratio; never upscales. JPEGs are decoded at 1/2, 1/4 or 1/8 scale
            directly (a 16384 x 8192 JPEG with ``max_width=4096`` peaks at about 170 MB);
            other formats are decoded whole first (4 bytes per pixel).
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
        except MemoryError as exc:
            raise _error(path, "not enough memory to decode it; pass a smaller `max_width`") from exc
        except Exception as exc:  # any decoder failure: report the file, never a bare PIL traceback
            raise _error(path, _reason(exc, path)) from exc
    pano = _to_tensor(pixels, scale, device)
    width, height = full_size
    if abs(width - 2 * height) > max(1.0, _ASPECT_TOLERANCE * width):
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
    if isinstance(exc, UnidentifiedImageError):
        size = _png_header_size(path)
        if size is not None and min(size) == 0:
            return f"the image has zero size ({size[0]}x{size[1]})"
        return "not a recognised image (JPEG, PNG, WebP, TIFF, ...)"
    text = f"{type(exc).__name__}: {str(exc).rstrip('.') or 'no details'}"
    if isinstance(exc, Image.DecompressionBombError):
        return f"the image is too large ({text})"
    if isinstance(exc, (OSError, SyntaxError, EOFError, struct.error, zlib.error)):
        return f"the image data is truncated or corrupt ({text})"
    return f"the image cannot be converted ({text})"


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
    if im.mode in ("1", "LA"):
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
_RAW16 = re.compile(r"^(RGB|RGBA);16([BLN])$")  # 16-bit gray + alpha stays 8-bit (no such unpacker)
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
    """16-bit RGB(A) as ``(h, w, 3)``: uint16 at full size, else float32 shrunk to ``target`` on the CPU.

    Decoded twice, low bytes then high bytes, each pass read strip by strip: about 10 bytes
    per pixel at the peak at full size, 4 (one decoded pass) when shrinking.
    """
    pixels: np.ndarray | None = None
    for shift in (0, 8):
        with Image.open(path) as im:
            if shift == 0:
                _swap_byte_order(im)
            im.load()
            full = im.size
            if full == target:
                pixels = np.zeros((full[1], full[0], 3), np.uint16) if pixels is None else pixels
                for y0, strip in _strips(im, 256):
                    pixels[y0:y0 + strip.shape[0]] |= strip.astype(np.uint16) << shift
            else:
                factor = max(1, full[0] // target[0])
                part = _box_reduce(im, factor) * float(1 << shift)
                pixels = part if pixels is None else pixels + part
    if full == target:
        return pixels
    box = (0.0, 0.0, full[0] / factor, full[1] / factor)  # the image in reduced pixels
    channels = [Image.fromarray(np.ascontiguousarray(pixels[:, :, c]), "F") for c in range(3)]
    return np.stack([np.asarray(c.resize(target, Image.Resampling.LANCZOS, box=box)) for c in channels], -1)


def _strips(im: Image.Image, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, RGB pixels (rows, W, 3))`` of a loaded image, a band of rows at a time."""
    for y0 in range(0, im.height, rows):
        yield y0, np.asarray(im.crop((0, y0, im.width, min(y0 + rows, im.height))))[:, :, :3]


def _box_reduce(im: Image.Image, factor: int) -> np.ndarray:
    """Average ``factor x factor`` blocks (partial blocks at the edges too) to float32 ``(h, w, 3)``."""
    starts = np.arange(0, im.width, factor)
    counts_x = np.diff(np.append(starts, im.width)).astype(np.float32)
    rows = []
    for _, strip in _strips(im, factor * 32):
        row_starts = np.arange(0, strip.shape[0], factor)
        counts_y = np.diff(np.append(row_starts, strip.shape[0])).astype(np.float32)
        summed = np.add.reduceat(np.add.reduceat(strip.astype(np.float32), row_starts, axis=0), starts, axis=1)
        rows.append(summed / (counts_y[:, None, None] * counts_x[None, :, None]))
    return np.concatenate(rows, axis=0)


def _to_tensor(pixels: np.ndarray, scale: float, device: torch.device) -> Tensor:
    """``(h, w, C)`` integer or float pixels -> ``(3, h, w)`` float32 in [0, 1], converted on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)  # integers travel before the float copy
    x = x.expand(-1, -1, 3) if x.shape[-1] == 1 else x  # (h, w, 3)
    x = x.to(torch.float32).contiguous().mul_(scale)  # (h, w, 3), pixel-interleaved in memory
    x = x if pixels.dtype == np.uint8 else x.clamp_(0.0, 1.0)
    # A (3, h, w) view of channels-last memory: projection samples it with one fused gather.
    return x.permute(2, 0, 1)
