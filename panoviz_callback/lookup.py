"""Find a model's vision encoder and resampler by attribute path (no Lightning needed).

Used by :class:`~panoviz_callback.PanoVizCallback` on the LightningModule and by the
checkpoint runner on a rebuilt module: ``"auto"`` tries the module's own ``encoder_attr`` /
``resampler_attr``, then the common names of :data:`ENCODER_SEARCH` / :data:`RESAMPLER_SEARCH`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["ENCODER_SEARCH", "RESAMPLER_SEARCH", "find_module", "find_part"]

_ENCODER_NAMES = ("vision_encoder", "vision_tower", "vision_model", "vision_backbone.encoder", "visual",
                  "image_encoder")
_RESAMPLER_NAMES = ("resampler", "resampler_module.resampler", "mm_projector", "multi_modal_projector")
#: Attribute paths tried in order by ``encoder="auto"`` (the module's own, then under ``model``; the generic
#: name ``encoder`` last).
ENCODER_SEARCH = _ENCODER_NAMES + tuple(f"model.{name}" for name in _ENCODER_NAMES) + ("encoder", "model.encoder")
#: Attribute paths tried in order by ``resampler="auto"``; none found means no resampler level.
RESAMPLER_SEARCH = _RESAMPLER_NAMES + tuple(f"model.{name}" for name in _RESAMPLER_NAMES)


def find_module(root: Any, spec: str, search: Sequence[str], what: str, *, exclude: Any = None,
                accept: Callable[[Any], bool] = callable) -> tuple[Any, str | None]:
    """Find the ``what`` (``"encoder"`` or ``"resampler"``) of ``root`` by attribute path.

    Args:
        root: the object searched (usually a LightningModule).
        spec: a dotted attribute path (``"model.vision_tower"``), or ``"auto"``: the first of
            ``root.{what}_attr`` (when it is a string) and ``search`` that exists, is not
            ``exclude`` and passes ``accept``.
        search: attribute paths tried in order by ``"auto"``, e.g. :data:`ENCODER_SEARCH`.
        what: the part looked for; names the ``{what}_attr`` attribute and the error message.
        exclude: an object never returned by ``"auto"`` (the encoder, when looking for the resampler).
        accept: the test an ``"auto"`` candidate must pass (default: :func:`callable`).

    Returns:
        ``(object, path)``, or ``(None, None)`` when ``"auto"`` finds nothing.

    Raises:
        AttributeError: the path ``spec`` does not exist on ``root``.
    """
    if spec != "auto":
        found = _get_path(root, spec)
        if found is None:
            raise AttributeError(f"`{type(root).__name__}` has no attribute `{spec}` (argument `{what}`).")
        return found, spec
    declared = getattr(root, f"{what}_attr", None)  # e.g. PanoVisionModule.encoder_attr
    for path in ((declared,) if isinstance(declared, str) else ()) + tuple(search):
        found = _get_path(root, path)
        if found is not None and found is not exclude and accept(found):
            return found, path
    return None, None


def find_part(root: Any, spec: Any, search: Sequence[str], what: str, *, required: bool,
          exclude: Any = None) -> tuple[Any, str | None]:
    """Resolve ``spec`` (``"auto"``, a dotted path, a callable or None) to ``(object, path or None)``.

    Raises:
        AttributeError: ``required`` and nothing was found, or the path ``spec`` does not exist.
    """
    if spec is None:
        return None, None
    if callable(spec) and not isinstance(spec, str):
        return spec, None
    found, path = find_module(root, spec, search, what, exclude=exclude)
    if found is None and required:
        raise AttributeError(f"could not find the vision {what} on `{type(root).__name__}`: none of "
                             f"{', '.join(search)} exists; pass `{what}='path.to.module'`.")
    return found, path


def _get_path(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
