"""How a checkpoint's weights fit a rebuilt part: slice by prefix, align key heads, report, refuse gaps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from panoviz_callback.checkpoint import Log, WeightsError, _first_line

__all__ = ["LoadReport", "finish_load", "load_part", "align_keys"]


@dataclass
class LoadReport:
    """How the checkpoint's weights fitted: per part, the prefix and the missing/unexpected keys."""

    prefixes: dict[str, str | None] = field(default_factory=dict)
    loaded: dict[str, int] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)
    unexpected: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no key is missing or unexpected."""
        return not any(self.missing.values()) and not any(self.unexpected.values())

    def problems(self, limit: int = 3) -> list[str]:
        """One line per part with missing or unexpected keys (counts and the first ``limit`` names)."""
        lines = []
        for part, prefix in self.prefixes.items():
            missing, unexpected = self.missing.get(part, []), self.unexpected.get(part, [])
            if not missing and not unexpected:
                continue
            bits = []
            for what, keys in (("missing", missing), ("unexpected", unexpected)):
                if keys:
                    more = ", ..." if len(keys) > limit else ""
                    bits.append(f"{len(keys)} {what} ({', '.join(keys[:limit])}{more})")
            lines.append(f"{part} weights under '{prefix or ''}': " + "; ".join(bits))
        return lines


def finish_load(report: LoadReport, strict: bool, log: Log, allow_missing: bool = False) -> None:
    """Refuse missing weights (a randomly initialised part), then raise (``strict``) or warn about the rest.

    A part with missing keys is an error unless ``allow_missing``; then each problem is logged and
    recorded in ``report.warnings``, which every output repeats.

    Raises:
        WeightsError: missing weights (without ``allow_missing``), or any mismatch with ``strict``.
    """
    if report.ok:
        return
    partial = [part for part, keys in report.missing.items() if keys]
    if partial and not allow_missing:
        raise WeightsError(
            f"the checkpoint lacks weights of the {' and '.join(partial)} ({' | '.join(report.problems())}); a "
            "randomly initialised part is never analysed (--allow_missing_weights analyses it anyway, and every "
            "output then says so)")
    if strict:
        raise WeightsError("the checkpoint's weights do not match the model (--strict): " + " | ".join(report.problems()))
    for line in report.problems():
        log(f"warning: {line}")
        if any(report.missing.values()):
            report.warnings.append(f"weights missing from the checkpoint, randomly initialised: {line}")


def load_part(part: str, module: nn.Module, state_dict: Mapping[str, Any], prefix: str | None,
               report: LoadReport, *, align: bool) -> None:
    expected = list(module.state_dict().keys())
    sliced = {k[len(prefix):]: v for k, v in state_dict.items() if prefix and k.startswith(prefix)}
    if align:
        sliced = align_keys(sliced, expected)
    try:
        result = module.load_state_dict(sliced, strict=False)
    except RuntimeError as err:
        sizes = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        detail = "; ".join(sizes[:3]) or _first_line(err)
        raise WeightsError(f"the {part} weights under '{prefix}' do not fit the rebuilt {part}: {detail}") from None
    report.loaded[part] = len(sliced) - len(result.unexpected_keys)
    report.missing[part] = list(result.missing_keys)
    report.unexpected[part] = [f"{prefix}{k}" for k in result.unexpected_keys]


def align_keys(sliced: dict[str, Any], expected: list[str]) -> dict[str, Any]:
    """Add or strip one leading component (``vision_model.``, ``model.``) so the keys match the module's."""
    if not sliced:
        return sliced
    want = set(expected)
    heads = {k.split(".", 1)[0] + "." for k in expected if "." in k} | {"vision_model.", "model.", "encoder."}
    candidates = [sliced]
    for head in heads:
        candidates.append({head + k: v for k, v in sliced.items()})
        if all(k.startswith(head) for k in sliced):
            candidates.append({k[len(head):]: v for k, v in sliced.items()})
    return max(candidates, key=lambda c: len(want.intersection(c)))


_load_part = load_part  # the name the PanoLLaVA adapter uses
