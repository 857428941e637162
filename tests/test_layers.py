"""Tests of panoviz_callback.layers and features.extract_layers: the layer sweep from one forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel

from panoviz_callback.analysis import Analyzer
from panoviz_callback.features import extract_features, extract_layers
from panoviz_callback.layers import (
    LayerSweep, OutputCapture, encoder_num_states, resampler_layer_modules, resolve_layers, sweep_metrics,
)
from panoviz_callback.models import build_resampler
from panoviz_callback.panorama import synthetic_panorama
from panoviz_callback.views import make_views

_S = 32


def _siglip() -> SiglipVisionModel:
    torch.manual_seed(0)
    return SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                num_attention_heads=2, image_size=_S, patch_size=8,
                                                vision_use_head=False)).eval()


def _dinov2() -> Dinov2Model:
    torch.manual_seed(0)
    return Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                                    patch_size=8, image_size=_S)).eval()


def _count_forwards(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.fixture(scope="module")
def views():
    return make_views(synthetic_panorama(64), "e2p", image_size=_S, patch_size=8)


@pytest.mark.parametrize("build", [_siglip, _dinov2])
@pytest.mark.parametrize("keep_cls_token", [False, True])
def test_one_forward_equals_separate_forwards(build, keep_cls_token):
    enc = build()
    x = torch.rand(4, 3, _S, _S)
    calls = _count_forwards(enc)
    with torch.no_grad():
        states = extract_layers(enc, x, [0, 2, -1, 3, -2], keep_cls_token=keep_cls_token)
    assert calls[0] == 1 and sorted(states) == [-2, -1, 0, 2, 3]
    for layer, feats in states.items():
        with torch.no_grad():
            alone = extract_features(enc, x, layer=layer, keep_cls_token=keep_cls_token)
        assert torch.equal(feats.tokens, alone.tokens), layer
        assert (feats.grid_hw, feats.num_prefix_tokens) == (alone.grid_hw, alone.num_prefix_tokens)


def test_extract_layers_exceptions():
    enc = _siglip()
    with pytest.raises(ValueError, match="Expected at least one layer"):
        extract_layers(enc, torch.rand(1, 3, _S, _S), [])
    with pytest.raises(ValueError, match=r"Argument `layer` must be in \[-4, 3\]"):
        extract_layers(enc, torch.rand(1, 3, _S, _S), [0, 4])
    with pytest.raises(TypeError, match="Expected `layer` to be an int"):
        extract_layers(enc, torch.rand(1, 3, _S, _S), [1.0])


def test_analysis_runs_the_encoder_once_with_a_layer_and_a_resampler(views):
    enc = _siglip()
    resampler = build_resampler("mlp", 32, 16).eval()
    calls = _count_forwards(enc)
    result = Analyzer(layer=1, metrics=["overlap_cosine"])(views, enc, resampler)
    assert calls[0] == 1
    last = Analyzer(layer=-1, metrics=["overlap_cosine"])(views, enc, resampler)
    assert calls[0] == 2
    assert torch.equal(result.levels["resampled"].features.tokens, last.levels["resampled"].features.tokens)
    with torch.no_grad():
        layer1 = extract_features(enc, views.pixels, layer=1).tokens
    assert torch.equal(result.levels["vision_encoder"].features.tokens, layer1)


def test_sweep_equals_the_analysis_of_each_layer(views):
    enc = _siglip()
    resampler = build_resampler("mlp", 32, 16).eval()
    calls = _count_forwards(enc)
    result = Analyzer(metrics=["overlap_cosine"], inside={"layers": "all"})(views, enc, resampler)
    assert calls[0] == 1  # the whole sweep came from the analysis' own forward
    sweep = result.inside.layer_sweep
    data = sweep.levels["vision_encoder"]
    assert data["layers"] == ["0", "1", "2", "3"]
    names = list(data["metrics"])  # overlap_cosine, plus overlap_cka and nn_accuracy where metrics has them
    for k in range(4):
        alone = Analyzer(layer=k, metrics=names)(views, enc).scalars()
        for name in names:
            assert data["metrics"][name][k] == pytest.approx(alone[f"vision_encoder/{name}"], abs=1e-6), (k, name)
    resampled = sweep.levels["resampled"]
    assert resampled["layers"] == ["0", "3", "6"]  # the MLP's Linear layers; the last one is its output
    final = result.scalars()["resampled/overlap_cosine"]
    assert resampled["metrics"]["overlap_cosine"][-1] == pytest.approx(final, abs=1e-6)
    assert result.scalars()["vision_encoder/layers/2/overlap_cosine"] == data["metrics"]["overlap_cosine"][2]


def test_sweep_of_a_query_resampler(views):
    enc = _siglip()
    resampler = build_resampler("qformer", 32, 16, num_queries=4, depth=2).eval()
    result = Analyzer(metrics=["token_cosine", "linear_cka"], inside={"layers": [1, -1]})(views, enc, resampler)
    sweep = result.inside.layer_sweep
    assert sweep.levels["vision_encoder"]["layers"] == ["1", "3"]
    resampled = sweep.levels["resampled"]
    assert resampled["layers"] == ["0", "1"] and set(resampled["metrics"]) == {"token_cosine", "linear_cka"}
    # the last layer's recorded output (before the final norm) is what the final LayerNorm reads
    with torch.no_grad(), OutputCapture(resampler_layer_modules(resampler)) as cap:
        tokens = extract_features(enc, views.pixels).tokens
        out = resampler(tokens)
    torch.testing.assert_close(resampler.norm_out(cap.outputs["1"]), out)
    assert sweep_metrics(cap.outputs["1"], views, None)["token_cosine"] == pytest.approx(
        resampled["metrics"]["token_cosine"][1], abs=1e-6)


def test_resolve_layers():
    assert resolve_layers("all", 4) == [0, 1, 2, 3]
    assert resolve_layers([3, -1, 0], 4) == [0, 3]
    assert resolve_layers([5, 1], None) == [1, 5]
    with pytest.raises(ValueError, match="needs an encoder whose depth is known"):
        resolve_layers("all", None)
    with pytest.raises(ValueError, match=r"Argument `layers` must hold indices in \[-4, 3\], got 4"):
        resolve_layers([4], 4)
    with pytest.raises(ValueError, match="Argument `layers` must be 'all'"):
        resolve_layers("last", 4)
    with pytest.raises(TypeError, match="Expected `layers` to be 'all' or a sequence of ints"):
        resolve_layers([1.5], 4)
    assert encoder_num_states(_siglip()) == 4 and encoder_num_states(lambda x: x) is None


def test_generic_encoder_sweep_is_skipped_with_a_reason(views):
    def encoder(x):
        return torch.nn.functional.avg_pool2d(x, 8).flatten(2).transpose(1, 2)

    result = Analyzer(metrics=[], normalize=None, inside={"layers": "all"})(views, encoder)
    assert result.inside.layer_sweep is None
    assert "needs an encoder whose depth is known" in result.inside.skipped["layer_sweep"]


def test_layer_sweep_scalars_and_dict():
    sweep = LayerSweep(levels={"vision_encoder": {"layers": ["0", "1"],
                                                  "metrics": {"overlap_cosine": [0.5, float("nan")]}}})
    assert sweep.scalars() == {"vision_encoder/layers/0/overlap_cosine": 0.5}
    assert sweep.to_dict()["levels"]["vision_encoder"]["metrics"]["overlap_cosine"] == [0.5, None]


@pytest.mark.skipif(not hasattr(__import__("panoviz_callback.metrics").metrics, "overlap_cka"),
                    reason="metrics.overlap_cka / nn_accuracy not available in this version")
def test_sweep_uses_overlap_cka_and_nn_accuracy(views):
    from panoviz_callback import metrics
    from panoviz_callback.correspondence import patch_correspondence

    enc = _siglip()
    result = Analyzer(metrics=[], inside={"layers": [1]})(views, enc)
    got = result.inside.layer_sweep.levels["vision_encoder"]["metrics"]
    tokens = extract_features(enc, views.pixels, layer=1).tokens
    cka, nn_acc = [], []
    for i, j in views.pairs:
        a, b = patch_correspondence(views, i, j, (4, 4))
        cka.append(float(metrics.overlap_cka(tokens[i], tokens[j], a, b)))
        nn_acc.append(float(metrics.nn_accuracy(tokens[i], tokens[j], a, b, (4, 4))))
    assert got["overlap_cka"][0] == pytest.approx(sum(cka) / len(cka), abs=1e-6)
    assert got["nn_accuracy"][0] == pytest.approx(sum(nn_acc) / len(nn_acc), abs=1e-6)
