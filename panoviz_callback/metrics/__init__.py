"""Similarity metrics between the views of a pair: token features and PCA images.

Pure tensor functions: inputs are cast to float32 (CKA accumulates in float64, the
Hungarian matching solves float64 cosines), everything stays on the inputs' device and
is batched over pairs ``P`` where the signature says so. Only the Hungarian assignment
leaves the device (scipy's ``linear_sum_assignment`` on the CPU). :class:`LPIPSMetric`
is the one stateful shell: it builds its network once and reports itself as skipped
when the ``lpips`` package or its backbone weights are not available.

Modules: :mod:`.cosine` (same-index and overlap cosines), :mod:`.cka` (same-index and
overlap-paired CKA), :mod:`.matching` (Hungarian matching, its accuracy, chance level and
ceiling, nearest-neighbour accuracy), :mod:`.image` (SSIM, LPIPS). Every public name is
importable from ``panoviz_callback.metrics``.

The private ``_*_views`` helpers compute the same metrics for many pairs of the ``V``
views of one probe, doing the per-view work once (unit tokens, centred Gram matrices
shared by both CKAs) instead of once per pair; :mod:`panoviz_callback.analysis` uses them.
"""

from __future__ import annotations

from panoviz_callback.metrics._common import _acc_dtype, _full_precision, _unit
from panoviz_callback.metrics.cka import (
    _cka_grams,
    _debiased_cka_views,
    _linear_cka_features,
    _linear_cka_views,
    _overlap_cka_views,
    debiased_cka,
    linear_cka,
    overlap_cka,
    overlap_debiased_cka,
)
from panoviz_callback.metrics.cosine import (
    _overlap_cosine_views,
    _token_cosine_views,
    overlap_cosine,
    overlap_cosine_pairs,
    token_cosine,
)
from panoviz_callback.metrics.image import LPIPSMetric, ssim
from panoviz_callback.metrics.matching import (
    _hungarian_accuracy_views,
    _hungarian_views,
    _matching_reference_views,
    _nn_accuracy_views,
    _overlap_hungarian_views,
    _overlap_sims,
    hungarian_accuracy,
    hungarian_cosine,
    matching_ceiling,
    matching_chance,
    nn_accuracy,
    overlap_hungarian,
)

__all__ = [
    "token_cosine",
    "overlap_cosine",
    "overlap_cosine_pairs",
    "hungarian_cosine",
    "overlap_hungarian",
    "hungarian_accuracy",
    "nn_accuracy",
    "matching_chance",
    "matching_ceiling",
    "linear_cka",
    "debiased_cka",
    "overlap_cka",
    "overlap_debiased_cka",
    "ssim",
    "LPIPSMetric",
]

_PRIVATE = (_acc_dtype, _full_precision, _unit, _cka_grams, _debiased_cka_views, _linear_cka_features,
            _linear_cka_views, _overlap_cka_views, _overlap_cosine_views, _token_cosine_views,
            _hungarian_accuracy_views, _hungarian_views, _matching_reference_views, _nn_accuracy_views,
            _overlap_hungarian_views, _overlap_sims)  # used by analysis.py and the tests through this package
