"""Token features of a vision encoder and a resampler, for any model a panoramic VLM uses.

:func:`extract_features` runs an encoder on views ``(V, 3, h, w)`` in ``[0, 1]`` and
returns :class:`TokenFeatures`: the tokens ``(V, N, D)`` in float32, the token grid
``(gh, gw)`` and the number of prefix tokens (CLS, registers). :func:`apply_resampler`
passes the patch tokens through a resampler and works out whether its output is still a
grid (same tokens, or a pooled grid) or a set of learned queries. :func:`load_vision_encoder`
builds an encoder offline from a config, a local ``save_pretrained`` folder, a cached hub
name or the preset ``"tiny"``.

Encoder families, recognised from ``config.model_type``; "last" (``layer=-1``) is the
model's ``last_hidden_state``:

- SigLIP (also SigLIP2 FixRes, which loads as SigLIP) and SigLIP2 NaFlex: no prefix token,
  mean/std 0.5; last = after ``post_layernorm``.
- CLIP (with or without projection): 1 CLS token, OpenAI CLIP mean/std; last = output of
  the last block (CLIP's ``post_layernorm`` only feeds the pooled output).
- DINOv2: 1 CLS token (+ ``num_register_tokens`` with registers), ImageNet mean/std;
  last = after the final ``layernorm``.

Full ``CLIPModel`` / ``SiglipModel`` / ``Siglip2Model`` are reduced to their
``vision_model``. Any other module or callable is "generic" (see :func:`extract_features`).
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from panoviz_callback._checks import _check_choice, _check_grid, _check_shape
from panoviz_callback.encoders import _FULL_MODEL_TYPES, load_vision_encoder  # noqa: F401 - re-exported

__all__ = [
    "TokenFeatures", "extract_features", "extract_layers", "apply_resampler", "load_vision_encoder",
    "encoder_normalization",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HALF = (0.5, 0.5, 0.5)

Stats = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass
class TokenFeatures:
    """Tokens of one level (encoder or resampler) for every view.

    Attributes:
        tokens: ``(V, N, D)`` float32. Prefix tokens come first when they were kept.
        grid_hw: the token grid ``(gh, gw)`` of the patch tokens (row-major), ``None`` for
            query tokens (QFormer, Perceiver).
        num_prefix_tokens: CLS + register tokens of the model (whether kept in ``tokens`` or
            not; ``N == num_prefix_tokens + gh * gw`` tells them apart). 0 after a resampler.
        layout: ``"grid"`` or ``"queries"``.
    """

    tokens: Tensor
    grid_hw: tuple[int, int] | None
    num_prefix_tokens: int
    layout: Literal["grid", "queries"]


@dataclass(frozen=True)
class _Family:
    stats: Stats
    registers: bool = False
    cls_token: bool = False
    naflex: bool = False
    fixed_size: bool = False


_FAMILIES = {
    "siglip_vision_model": _Family((_HALF, _HALF), fixed_size=True),
    "siglip2_vision_model": _Family((_HALF, _HALF), naflex=True),
    "clip_vision_model": _Family((OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), cls_token=True, fixed_size=True),
    "dinov2": _Family((IMAGENET_MEAN, IMAGENET_STD), cls_token=True),
    "dinov2_with_registers": _Family((IMAGENET_MEAN, IMAGENET_STD), cls_token=True, registers=True),
}
_RANGE_TOL = 0.05


@dataclass
class _Encoder:
    call: Callable[..., Any]
    base: Any
    config: Any
    family: _Family | None

    @property
    def name(self) -> str:
        return type(self.base).__name__


def _resolve(encoder: Any) -> _Encoder:
    """Find the module to call (a full CLIP/SigLIP model's vision tower) and its family."""
    base = getattr(encoder, "_orig_mod", encoder)  # torch.compile wrapper
    config = getattr(base, "config", None)
    tower = getattr(base, "vision_model", None)
    if getattr(config, "model_type", None) in _FULL_MODEL_TYPES and isinstance(tower, nn.Module):
        encoder = base = tower
        config = getattr(base, "config", None)
    family = _FAMILIES.get(getattr(config, "model_type", None))
    return _Encoder(encoder, base, config, family)


def _num_prefix(enc: _Encoder) -> int:
    if enc.family is not None:
        return int(enc.family.cls_token) + (int(enc.config.num_register_tokens) if enc.family.registers else 0)
    value = getattr(enc.base, "num_prefix_tokens", 0)
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"Expected `{enc.name}.num_prefix_tokens` to be a non-negative int, got {value!r}.")
    return value


def _patch_size(enc: _Encoder) -> tuple[int, int] | None:
    for owner in (enc.base, enc.config, getattr(enc.base, "patch_embed", None)):
        value = getattr(owner, "patch_size", None) if owner is not None else None
        if isinstance(value, int) and value > 0:
            return value, value
        if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
            return int(value[0]), int(value[1])
    return None


def encoder_normalization(encoder: Any) -> Stats | None:
    """The ``(mean, std)`` per channel that ``normalize="auto"`` applies for ``encoder``.

    SigLIP / SigLIP2: 0.5 / 0.5; CLIP: OpenAI CLIP's values; DINOv2: ImageNet's. A generic
    module: its ``image_mean`` / ``image_std`` attributes when it has both, else ``None``
    (no normalisation).

    Example:
        >>> from transformers import Dinov2Config, Dinov2Model
        >>> encoder_normalization(Dinov2Model(Dinov2Config(hidden_size=8, num_hidden_layers=1,
        ...     num_attention_heads=1, intermediate_size=8)))
        ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    """
    enc = _resolve(encoder)
    if enc.family is not None:
        return enc.family.stats
    mean, std = getattr(enc.base, "image_mean", None), getattr(enc.base, "image_std", None)
    if mean is None or std is None:
        return None
    return _as_stats((mean, std))


def _as_stats(pair: Any) -> Stats:
    if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
        raise ValueError(f"Argument `normalize` must be 'auto', None or a (mean, std) pair, got {pair!r}.")
    out = []
    for value in pair:
        seq = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
        if len(seq) != 3:
            raise ValueError(f"Expected `normalize` mean and std to be a number or 3 numbers, got {value!r}.")
        out.append(tuple(seq))
    if min(out[1]) <= 0:
        raise ValueError(f"Expected `normalize` std to be positive, got {out[1]}.")
    return out[0], out[1]


def extract_features(
    encoder: Callable[..., Any],
    pixels: Tensor,
    *,
    layer: int = -1,
    keep_cls_token: bool = False,
    normalize: Literal["auto"] | tuple[Any, Any] | None = "auto",
    grid_hw: tuple[int, int] | None = None,
) -> TokenFeatures:
    """Run ``encoder`` on the views and return its tokens on their grid.

    The forward runs under whatever grad mode, autocast and dtype the caller set; the module's
    train/eval mode is not touched. The output is cast to float32 afterwards.

    Args:
        encoder: a transformers vision model (SigLIP, SigLIP2, CLIP, CLIP with projection,
            DINOv2 with or without registers), a full ``CLIPModel`` / ``SiglipModel`` (its
            ``vision_model`` is used), or any module/callable mapping ``(V, 3, h, w)`` to
            ``(V, N, D)``, a tuple (first item) or a transformers output (``last_hidden_state``).
        pixels: views ``(V, 3, h, w)`` in ``[0, 1]``; ``h != w`` gives a non-square grid.
        layer: ``-1`` is the model's ``last_hidden_state`` (after SigLIP's ``post_layernorm``
            and DINOv2's final ``layernorm``; CLIP's equals the last block's output). Any
            other index, negative or positive, indexes ``hidden_states`` (``0`` = embedding
            output, ``L`` = output of block ``L`` before any final norm), valid in ``[-(L+1), L]``
            for ``L`` blocks; so ``layer=k`` and ``layer=k-(L+1)`` agree except ``L`` vs ``-1``.
        keep_cls_token: keep the prefix tokens (CLS, registers) in front of the patch tokens.
        normalize: ``"auto"`` (the model's mean/std, see :func:`encoder_normalization`), an
            explicit ``(mean, std)`` pair (numbers or 3-sequences), or ``None`` (pixels go in
            as given).
        grid_hw: the token grid, for generic encoders whose grid cannot be inferred.

    Generic encoders: prefix tokens are ``encoder.num_prefix_tokens`` (else 0), the grid comes
    from ``grid_hw``, else a ``patch_size`` attribute (of the module, its ``config`` or its
    ``patch_embed``), else the grid of ``N`` tokens with the views' aspect ratio (``sqrt(N)``
    for square views). ``layer != -1`` needs an encoder that accepts
    ``output_hidden_states`` and returns ``hidden_states``.
    SigLIP2 NaFlex models get the views as ``gh x gw`` patches with ``spatial_shapes``
    and an all-ones ``pixel_attention_mask`` (no resizing, no padding); SigLIP/CLIP at a size
    other than ``config.image_size`` get ``interpolate_pos_encoding=True``.

    Returns:
        :class:`TokenFeatures` with ``tokens`` ``(V, N, D)`` float32 and ``layout="grid"``.

    Raises:
        TypeError: ``pixels`` is not a tensor or ``encoder`` not callable.
        ValueError: a bad shape, ``layer`` out of range, pixels outside ``[0, 1]`` when
            normalising, or token count that does not fit the grid.

    Example:
        >>> enc = lambda x: x.flatten(2).transpose(1, 2)  # one token per pixel, (V, h*w, 3)
        >>> feats = extract_features(enc, torch.rand(2, 3, 4, 6), grid_hw=(4, 6))
        >>> tuple(feats.tokens.shape), feats.grid_hw, feats.num_prefix_tokens
        ((2, 24, 3), (4, 6), 0)
    """
    return extract_layers(encoder, pixels, [layer], keep_cls_token=keep_cls_token, normalize=normalize,
                          grid_hw=grid_hw)[layer]


def extract_layers(
    encoder: Callable[..., Any],
    pixels: Tensor,
    layers: Sequence[int],
    *,
    keep_cls_token: bool = False,
    normalize: Literal["auto"] | tuple[Any, Any] | None = "auto",
    grid_hw: tuple[int, int] | None = None,
) -> dict[int, TokenFeatures]:
    """Several hidden states of ``encoder`` from ONE forward: ``{layer: TokenFeatures}``.

    ``extract_layers(enc, x, [k])[k]`` is ``extract_features(enc, x, layer=k)``; asking for more
    layers costs no further forward (the encoder returns all ``hidden_states`` at once).

    Args:
        encoder: as for :func:`extract_features`.
        pixels: views ``(V, 3, h, w)`` in ``[0, 1]``.
        layers: hidden-state indices as :func:`extract_features`'s ``layer`` (``-1``: the
            ``last_hidden_state``); duplicates are returned once.
        keep_cls_token: keep the prefix tokens.
        normalize: as for :func:`extract_features`.
        grid_hw: as for :func:`extract_features`.

    Returns:
        ``{layer: TokenFeatures}`` with ``tokens`` ``(V, N, D)`` float32, one entry per distinct layer.

    Raises:
        TypeError: ``pixels`` is not a tensor, ``encoder`` not callable, a layer not an int.
        ValueError: as :func:`extract_features`, or ``layers`` empty.

    Example:
        >>> from transformers import Dinov2Config, Dinov2Model
        >>> enc = Dinov2Model(Dinov2Config(hidden_size=8, num_hidden_layers=2, num_attention_heads=1,
        ...     intermediate_size=8, patch_size=4, image_size=8)).eval()
        >>> sorted(extract_layers(enc, torch.rand(2, 3, 8, 8), [0, 2, -1]))
        [-1, 0, 2]
    """
    _check_shape(pixels, "V 3 h w", "pixels")
    if not callable(encoder):
        raise TypeError(f"Expected `encoder` to be a module or callable, got {type(encoder).__name__}.")
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise ValueError("Expected at least one layer in `layers`, got none.")
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"Expected `layer` to be an int, got {type(layer).__name__}.")
    if grid_hw is not None:
        grid_hw = _check_grid(grid_hw)
    enc = _resolve(encoder)
    if isinstance(normalize, str):
        _check_choice(normalize, ("auto",), "normalize")
        stats = encoder_normalization(encoder)
    else:
        stats = None if normalize is None else _as_stats(normalize)
    x = pixels
    if stats is not None:
        _check_unit_range(pixels)
        mean = torch.tensor(stats[0], device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(stats[1], device=pixels.device).view(1, 3, 1, 1)
        x = (pixels.float() - mean) / std  # (V, 3, h, w)

    hidden_layers = [layer for layer in layers if layer != -1]
    probe = hidden_layers[0] if hidden_layers else -1  # any layer != -1 asks for hidden_states
    if enc.family is not None:
        for layer in hidden_layers:
            _check_layer(layer, int(enc.config.num_hidden_layers) + 1, enc.name)
        out = _forward_family(enc, x, probe)
        states = {layer: _main_output(out, enc.name) if layer == -1 else out.hidden_states[layer] for layer in layers}
    else:
        out = _forward_generic(enc, x, probe)
        states = {layer: _main_output(out, enc.name) if layer == -1 else _generic_hidden(out, layer, enc.name)
                  for layer in layers}
    prefix = _num_prefix(enc)
    result = {}
    for layer, hidden in states.items():
        _check_shape(hidden, "V N D", f"{enc.name} output")
        if hidden.shape[0] != pixels.shape[0]:
            raise ValueError(
                f"Expected {enc.name} to return tokens for {pixels.shape[0]} views, got {hidden.shape[0]}.")
        tokens = hidden.float()  # (V, N, D)
        grid = _token_grid(enc, tokens.shape[1], prefix, pixels.shape[-2:], grid_hw)
        if not keep_cls_token:
            tokens = tokens[:, prefix:]  # (V, gh*gw, D)
        result[layer] = TokenFeatures(tokens.contiguous(), grid, prefix, "grid")
    return result


def _check_unit_range(pixels: Tensor) -> None:
    lo, hi = (float(v) for v in torch.aminmax(pixels.detach()))
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise ValueError(
            f"Expected `pixels` in [0, 1] (the encoder's normalisation is applied here), got values in "
            f"[{lo:.3g}, {hi:.3g}]. Pass normalize=None for pixels that are already normalised."
        )


def _check_layer(layer: int, n_states: int, name: str) -> None:
    if not -n_states <= layer < n_states:
        raise ValueError(
            f"Argument `layer` must be in [{-n_states}, {n_states - 1}] for {name} with {n_states - 1} layers "
            f"(0 = embeddings, -1 = last_hidden_state), got {layer}."
        )


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _forward_family(enc: _Encoder, x: Tensor, layer: int) -> Any:
    config, family = enc.config, enc.family
    kwargs: dict[str, Any] = {"return_dict": True}
    if layer != -1:
        kwargs["output_hidden_states"] = True
    v, _, h, w = x.shape
    if family.naflex:
        p = int(config.patch_size)
        if h % p or w % p:
            raise ValueError(f"Expected {enc.name} (NaFlex) views divisible by the patch size {p}, got {h}x{w}.")
        gh, gw = h // p, w // p
        # the image processor's patch order: row-major patches, each flattened as (p, p, 3)
        patches = x.reshape(v, 3, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1)  # (V, gh, gw, p, p, 3)
        patches = patches.reshape(v, gh * gw, p * p * 3)  # (V, N, p*p*3)
        kwargs["pixel_attention_mask"] = torch.ones(v, gh * gw, dtype=torch.int32, device=x.device)
        kwargs["spatial_shapes"] = torch.tensor([gh, gw], device=x.device).repeat(v, 1)  # (V, 2)
        return enc.call(pixel_values=patches, **kwargs)
    if family.fixed_size:
        size = config.image_size
        size_hw = tuple(size) if isinstance(size, Sequence) else (size, size)
        if (h, w) != size_hw:
            forward = getattr(enc.base, "forward", enc.base)
            if not _accepts(forward, "interpolate_pos_encoding"):
                raise ValueError(
                    f"{enc.name} expects {size_hw[0]}x{size_hw[1]} views (config.image_size) and cannot interpolate "
                    f"its position embeddings; got {h}x{w}."
                )
            kwargs["interpolate_pos_encoding"] = True
    return enc.call(pixel_values=x, **kwargs)


def _forward_generic(enc: _Encoder, x: Tensor, layer: int) -> Any:
    kwargs: dict[str, Any] = {}
    if layer != -1:
        forward = getattr(enc.base, "forward", enc.base)
        hf = sys.modules.get("transformers")
        if (hf is not None and isinstance(enc.base, hf.PreTrainedModel)) or _accepts(forward, "output_hidden_states"):
            kwargs["output_hidden_states"] = True
        else:
            raise ValueError(
                f"Argument `layer` other than -1 needs an encoder that returns hidden states; {enc.name} takes no "
                f"`output_hidden_states`. Pass layer=-1 or wrap the encoder so it returns the layer you want."
            )
    dtype = _param_dtype(enc.base)
    return enc.call(x if dtype is None else x.to(dtype), **kwargs)


def _param_dtype(module: Any) -> torch.dtype | None:
    if isinstance(module, nn.Module):
        for param in module.parameters():
            if param.is_floating_point():
                return param.dtype
    return None


def _main_output(out: Any, name: str) -> Tensor:
    if isinstance(out, Tensor):
        return out
    hidden = out.get("last_hidden_state") if isinstance(out, Mapping) else getattr(out, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"Expected {name} to return a (V, N, D) tensor, a tuple starting with one or an output with "
        f"`last_hidden_state`, got {type(out).__name__}."
    )


def _generic_hidden(out: Any, layer: int, name: str) -> Tensor:
    states = out.get("hidden_states") if isinstance(out, Mapping) else getattr(out, "hidden_states", None)
    if not isinstance(states, (tuple, list)) or not states:
        raise ValueError(f"Argument `layer` other than -1 needs hidden states, but {name} returned none.")
    _check_layer(layer, len(states), name)
    return states[layer]


def _token_grid(
    enc: _Encoder, n: int, prefix: int, hw: Sequence[int], grid_hw: tuple[int, int] | None,
) -> tuple[int, int]:
    h, w = int(hw[0]), int(hw[1])
    n_patch = n - prefix
    patch = None if grid_hw is not None else _patch_size(enc)
    if grid_hw is not None:
        grid, source = grid_hw, "grid_hw"
    elif patch is not None:
        grid, source = (h // patch[0], w // patch[1]), f"{h}x{w} views with patch size {patch[0]}x{patch[1]}"
    else:
        step = math.sqrt(h * w / n_patch) if n_patch > 0 else 0.0
        grid = (round(h / step), round(w / step)) if step > 0 else (0, 0)
        if grid[0] * grid[1] != n_patch or min(grid) < 1:
            raise ValueError(
                f"Cannot infer the token grid of {enc.name}: {n} tokens ({prefix} prefix) fit no grid with the "
                f"aspect ratio of {h}x{w} views. Give the encoder a `patch_size` (and `num_prefix_tokens` for "
                f"CLS/register tokens) attribute, or pass grid_hw=(gh, gw)."
            )
        return grid
    if grid[0] * grid[1] != n_patch:
        raise ValueError(
            f"{enc.name} returned {n} tokens, but {source} give a {grid[0]}x{grid[1]} grid of {grid[0] * grid[1]} "
            f"tokens plus {prefix} prefix tokens ({grid[0] * grid[1] + prefix}). Set `num_prefix_tokens` on a "
            f"generic encoder that has CLS/register tokens, or pass grid_hw=(gh, gw)."
        )
    return grid


def apply_resampler(
    resampler: Callable[..., Any], features: TokenFeatures, *, layout: Literal["auto", "grid", "queries"] = "auto",
) -> TokenFeatures:
    """Pass the encoder's patch tokens through ``resampler`` and find the output's layout.

    The resampler gets ``(V, gh*gw, D)``: prefix tokens are dropped if ``features`` kept them,
    as in training, unless it declares ``input_tokens = "all"`` (PanoLLaVA's resamplers see every
    token); the tokens are cast to the resampler's parameter dtype.

    ``layout="auto"`` decides, in this order:

    - a declared layout: ``resampler.output_layout`` in ``("grid", "queries")``; a positive
      ``resampler.num_queries`` or a class name containing ``QFormer`` / ``Perceiver`` means
      ``"queries"``;
    - ``M == N``: the input grid;
    - ``M`` equal to a ``k x k`` pooling of the input grid (``k > 1``; exact, then floor,
      then ceil division): the pooled grid;
    - otherwise ``"queries"``.

    ``"grid"`` forces a grid (an error when ``M`` fits neither rule), ``"queries"`` forces queries.

    Args:
        resampler: module or callable mapping ``(V, N, D)`` to ``(V, M, D')``, a tuple (first
            item) or a transformers output (``last_hidden_state``).
        features: the encoder's :class:`TokenFeatures` (from :func:`extract_features`).
        layout: ``"auto"``, ``"grid"`` or ``"queries"``.

    Returns:
        :class:`TokenFeatures` with ``tokens`` ``(V, M, D')`` float32, ``num_prefix_tokens=0``,
        ``grid_hw`` the output grid or ``None`` for queries.

    Example:
        >>> feats = TokenFeatures(torch.rand(2, 16, 8), (4, 4), 0, "grid")
        >>> pool = lambda t: t.view(2, 2, 2, 2, 2, 8).mean((2, 4)).reshape(2, 4, 8)
        >>> apply_resampler(pool, feats).grid_hw
        (2, 2)
    """
    if not isinstance(features, TokenFeatures):
        raise TypeError(f"Expected `features` to be TokenFeatures, got {type(features).__name__}.")
    if not callable(resampler):
        raise TypeError(f"Expected `resampler` to be a module or callable, got {type(resampler).__name__}.")
    _check_choice(layout, ("auto", "grid", "queries"), "layout")
    _check_shape(features.tokens, "V N D", "features.tokens")
    base = getattr(resampler, "_orig_mod", resampler)
    # a resampler declaring ``input_tokens = "all"`` gets the prefix tokens too (when kept), as in its training
    tokens = features.tokens if getattr(base, "input_tokens", "patch") == "all" else _patch_tokens(features)
    dtype = _param_dtype(base)
    out = resampler(tokens if dtype is None else tokens.to(dtype))
    name = type(base).__name__
    result = _main_output(out, name)
    _check_shape(result, "V M D", f"{name} output")
    if result.shape[0] != tokens.shape[0]:
        raise ValueError(f"Expected {name} to keep the {tokens.shape[0]} views, got {result.shape[0]}.")
    mode = layout if layout != "auto" else _declared_layout(base)
    grid = None if mode == "queries" else _resampled_grid(features, _patch_tokens(features).shape[1], result.shape[1])
    if grid is None and mode == "grid":
        raise ValueError(
            f"Argument `layout` is 'grid' but {name} returned {result.shape[1]} tokens, which is neither the input "
            f"grid {features.grid_hw} nor a k x k pooling of it."
        )
    return TokenFeatures(result.float().contiguous(), grid, 0, "queries" if grid is None else "grid")


def _patch_tokens(features: TokenFeatures) -> Tensor:
    tokens, grid, prefix = features.tokens, features.grid_hw, features.num_prefix_tokens
    if grid is not None and prefix > 0 and tokens.shape[1] == grid[0] * grid[1] + prefix:
        return tokens[:, prefix:]  # (V, gh*gw, D)
    return tokens


def _declared_layout(resampler: Any) -> str | None:
    declared = getattr(resampler, "output_layout", None)
    if declared in ("grid", "queries"):
        return declared
    queries = getattr(resampler, "num_queries", None)
    if isinstance(queries, int) and not isinstance(queries, bool) and queries > 0:
        return "queries"
    cls_name = type(resampler).__name__.lower()
    return "queries" if "qformer" in cls_name or "perceiver" in cls_name else None


def _resampled_grid(features: TokenFeatures, n: int, m: int) -> tuple[int, int] | None:
    if features.layout != "grid" or features.grid_hw is None:
        return None
    gh, gw = features.grid_hw
    if m == n:
        return gh, gw
    for rounding in ("exact", "floor", "ceil"):
        for k in range(2, max(gh, gw) + 1):
            if rounding == "exact" and (gh % k or gw % k):
                continue
            pooled = (-(-gh // k), -(-gw // k)) if rounding == "ceil" else (gh // k, gw // k)
            if min(pooled) >= 1 and pooled[0] * pooled[1] == m:
                return pooled
    return None

