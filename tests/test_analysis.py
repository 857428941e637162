import io
import json
import math

import pytest
import torch
from torch import nn

from panoviz_callback.analysis import METRICS, AnalysisResult, Analyzer, MetricResult, analyze
from panoviz_callback.features import extract_features
from panoviz_callback.metrics import LPIPSMetric
from panoviz_callback.panorama import synthetic_panorama
from panoviz_callback.projection import pixel_to_direction
from panoviz_callback.views import make_views

NO_LPIPS = [m for m in METRICS if m != "lpips"]
NO_OVERLAP = "not applicable: the views of this crop strategy do not overlap"
NO_POSITION = "not applicable: query tokens have no spatial position"


def _siglip(hidden=32, image_size=64, seed=0):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                num_attention_heads=2, patch_size=16, image_size=image_size, vision_use_head=False)
    return SiglipVisionModel(config).eval()


class AvgPool2x2(nn.Module):
    """A pooled-grid resampler: (V, gh*gw, D) -> (V, gh/2*gw/2, D)."""

    def forward(self, x):
        v, n, d = x.shape
        g = int(math.isqrt(n))
        grid = x.transpose(1, 2).reshape(v, d, g, g)
        return nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)


class Queries(nn.Module):
    """A query-token resampler (Q learned queries cross-attending the tokens)."""

    def __init__(self, dim=32, num_queries=6):
        super().__init__()
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, dim, generator=torch.Generator().manual_seed(1)))

    def forward(self, x):
        attn = torch.softmax(self.queries @ x.transpose(1, 2) / x.shape[-1] ** 0.5, dim=-1)  # (V, Q, N)
        return attn @ x


class DirectionEncoder(nn.Module):
    """Token features that depend only on the viewing direction of the token centre.

    Built from the views' cameras: every token gets a fixed random Fourier embedding of
    the world direction its centre looks at, so two tokens that see the same scene point
    get (nearly) the same feature whatever view they belong to.
    """

    patch_size = 16

    def __init__(self, views, dim=48, freq=4.0, seed=0):
        super().__init__()
        s, p = views.image_size, self.patch_size
        centres = (torch.arange(s // p, dtype=torch.float64) + 0.5) * p - 0.5
        ys, xs = torch.meshgrid(centres, centres, indexing="ij")
        xy = torch.stack([xs, ys], -1).reshape(1, -1, 2).expand(len(views), -1, -1)  # (V, N, 2)
        dirs, _ = pixel_to_direction(xy, views.cameras, s)  # (V, N, 3)
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(3, dim, generator=g, dtype=torch.float64) * freq
        b = torch.rand(dim, generator=g, dtype=torch.float64) * 2 * math.pi
        self.register_buffer("tokens", torch.cos(dirs @ w + b).float())  # (V, N, D)

    def forward(self, pixels):
        return self.tokens[: pixels.shape[0]] + 0 * pixels.mean()


@pytest.fixture(scope="module")
def pano():
    return synthetic_panorama(128)


@pytest.fixture(scope="module")
def encoder():
    return _siglip()


def _random_lpips():
    return LPIPSMetric(pretrained_backbone=False)


@pytest.mark.parametrize(
    "strategy, resampler, res_grid",
    [
        ("e2p", lambda: nn.Linear(32, 16), (4, 4)),
        ("anyres_e2p", lambda: AvgPool2x2(), (2, 2)),
        ("cubemap", lambda: nn.Linear(32, 16), (4, 4)),
        ("sliding_window", lambda: Queries(), None),
    ],
)
def test_smoke_strategies(pano, encoder, strategy, resampler, res_grid):
    views = make_views(pano, strategy, image_size=64)
    result = analyze(views, encoder, resampler(), metrics=NO_LPIPS)
    assert isinstance(result, AnalysisResult)
    assert set(result.levels) == {"vision_encoder", "resampled"}
    enc, res = result.levels["vision_encoder"], result.levels["resampled"]
    v = len(views)
    assert enc.features.grid_hw == (4, 4) and enc.features.tokens.shape == (v, 16, 32)
    assert enc.pca_images.shape == (v, 3, 4, 4) and enc.fg_mask.shape == (v, 16)
    assert list(enc.metrics) == NO_LPIPS  # report order
    if res_grid is None:
        assert res.features.layout == "queries" and res.pca_images.shape == (v, 3, 1, 6)
    else:
        assert res.features.grid_hw == res_grid
        assert res.pca_images.shape == (v, 3, *res_grid)
    for level in result.levels.values():
        assert level.pca_images.dtype == torch.float32
        assert 0 <= float(level.pca_images.min()) and float(level.pca_images.max()) <= 1
        for name, m in level.metrics.items():
            if m.skipped is None:
                assert len(m.per_pair) == len(views.pairs), name
                assert math.isfinite(m.mean) and math.isfinite(m.std), name
    overlap_metrics = ("overlap_cosine", "hungarian_accuracy", "nn_accuracy", "overlap_cka", "overlap_debiased_cka",
                       "ssim")
    if strategy == "cubemap":
        for name in overlap_metrics:
            assert enc.metrics[name].skipped == NO_OVERLAP
            assert res.metrics[name].skipped == NO_OVERLAP
    else:
        for name in overlap_metrics:
            assert enc.metrics[name].skipped is None, name
    if res_grid is None:
        for name in overlap_metrics:
            assert res.metrics[name].skipped == NO_POSITION
        for name in ("token_cosine", "hungarian_cosine", "linear_cka", "debiased_cka"):
            assert res.metrics[name].skipped is None
        # query tokens: the order-free all-token matching is at least the same-index cosine
        hung, tok = res.metrics["hungarian_cosine"].per_pair, res.metrics["token_cosine"].per_pair
        assert all(h >= t - 1e-5 for h, t in zip(hung, tok))
    if strategy == "cubemap":  # grid levels match overlap tokens: nothing to match without overlap
        assert enc.metrics["hungarian_cosine"].skipped == NO_OVERLAP


def test_convention_direction_features_overlap_beats_token_cosine(pano):
    """Features that are a function of the viewing direction: the same scene point gives the same
    feature in every view, so overlap_cosine ~ 1 while tokens at the same index (different
    directions) agree much less. SSIM of the warped PCA images is high for the same reason."""
    views = make_views(pano, "e2p", image_size=224)
    result = analyze(views, DirectionEncoder(views), metrics=NO_LPIPS, bg_removal="none", normalize=None)
    m = result.levels["vision_encoder"].metrics
    assert m["overlap_cosine"].mean > 0.9
    assert m["token_cosine"].mean < m["overlap_cosine"].mean - 0.3
    assert m["hungarian_accuracy"].mean > 0.8  # the order-free matching finds the geometric partners
    assert m["ssim"].mean > 0.9

    # a scene-independent encoder (random tokens per view) does not show the effect
    class Noise(nn.Module):
        patch_size = 16

        def forward(self, x):
            return torch.randn(x.shape[0], 196, 48, generator=torch.Generator().manual_seed(0))

    noise = analyze(views, Noise(), metrics=["overlap_cosine"], normalize=None)
    assert abs(noise.levels["vision_encoder"].metrics["overlap_cosine"].mean) < 0.1


@pytest.mark.parametrize(("dim", "metrics"), [(48, NO_LPIPS), (8, NO_LPIPS), (8, ["linear_cka"])])
def test_metrics_equal_the_per_pair_functions(pano, dim, metrics):
    """The batched per-view work (unit tokens, Gram matrices, one transfer for the Hungarian) gives the
    values of the public per-pair functions; D = 48 > N = 16 takes the Gram form of CKA, and linear CKA
    alone at D = 8 <= N the feature form."""
    from panoviz_callback import metrics as m
    from panoviz_callback.correspondence import patch_correspondence

    views = make_views(pano, "e2p", image_size=64)
    encoder = DirectionEncoder(views, dim=dim)
    tokens = encoder.tokens
    result = analyze(views, encoder, metrics=metrics, normalize=None).levels["vision_encoder"].metrics
    want = {}
    for i, j in views.pairs:
        ci, cj = patch_correspondence(views, i, j, (4, 4))
        cos, cols = m.overlap_hungarian(tokens[i], tokens[j], ci)
        values = {"token_cosine": m.token_cosine(tokens[i][None], tokens[j][None])[0],
                  "overlap_cosine": m.overlap_cosine(tokens[i], tokens[j], ci, cj), "hungarian_cosine": cos,
                  "hungarian_accuracy": m.hungarian_accuracy(cols, ci, cj, (4, 4)),
                  "nn_accuracy": m.nn_accuracy(tokens[i], tokens[j], ci, cj, (4, 4)),
                  "linear_cka": m.linear_cka(tokens[i], tokens[j]),
                  "debiased_cka": m.debiased_cka(tokens[i], tokens[j]),
                  "overlap_cka": m.overlap_cka(tokens[i], tokens[j], ci, cj),
                  "overlap_debiased_cka": m.overlap_debiased_cka(tokens[i], tokens[j], ci, cj)}
        for name, value in values.items():
            want.setdefault(name, []).append(float(value))
    assert set(result) == set(metrics)
    for name in metrics:
        if name != "ssim":
            assert result[name].per_pair == pytest.approx(want[name], abs=1e-5, nan_ok=True), name


def test_to_dict_schema_and_scalars(pano, encoder):
    views = make_views(pano, "cubemap", image_size=64)
    result = analyze(views, encoder, Queries(), metrics=["token_cosine", "overlap_cosine", "ssim"])
    data = json.loads(json.dumps(result.to_dict(image="pano.jpg", checkpoint="last.ckpt"), allow_nan=False))
    assert set(data) == {"image", "checkpoint", "crop_strategy", "views", "pairs", "levels"}
    assert data["image"] == "pano.jpg" and data["checkpoint"] == "last.ckpt" and data["crop_strategy"] == "cubemap"
    assert data["views"][1] == {"yaw_deg": 90.0, "pitch_deg": 0.0, "fov_deg": 90.0, "kind": "face"}
    assert data["pairs"] == [list(p) for p in views.pairs]
    enc = data["levels"]["vision_encoder"]
    assert enc["token_grid"] == [4, 4]
    assert set(enc["metrics"]["token_cosine"]) == {"per_pair", "mean", "std"}
    assert enc["metrics"]["overlap_cosine"] == {"skipped": NO_OVERLAP}
    assert data["levels"]["resampled"]["token_grid"] is None
    assert data["levels"]["resampled"]["metrics"]["overlap_cosine"] == {"skipped": NO_POSITION}
    res = data["levels"]["resampled"]
    assert len(enc["masked_share"]) == len(views) and len(res["masked_share"]) == len(views)
    assert result.scalars() == pytest.approx({
        "vision_encoder/token_cosine": enc["metrics"]["token_cosine"]["mean"],
        "resampled/token_cosine": res["metrics"]["token_cosine"]["mean"],
        "vision_encoder/masked_share": sum(enc["masked_share"]) / len(views),
        "resampled/masked_share": sum(res["masked_share"]) / len(views),
    }, abs=1e-6)
    assert analyze(views, encoder, metrics=()).levels["vision_encoder"].metrics == {}


def test_metric_result_partial_overlap_and_nan():
    m = MetricResult.from_values([0.5, math.nan, 1.0], "never")
    assert m.mean == 0.75 and m.std == 0.25
    assert m.to_dict() == {"per_pair": [0.5, None, 1.0], "mean": 0.75, "std": 0.25}
    assert MetricResult.from_values([math.nan], "no overlap").to_dict() == {"skipped": "no overlap"}


def test_stable_colors_and_state_dict_roundtrip(pano, encoder):
    views = make_views(pano, "e2p", image_size=64)
    resampler = nn.Linear(32, 16)
    analyzer = Analyzer(metrics=["token_cosine"])
    first = analyzer(views, encoder, resampler)
    second = analyzer(views, encoder, resampler)
    for level in first.levels:  # identical tokens, identical colours (the warm-started refit: ~1e-7)
        torch.testing.assert_close(first.levels[level].pca_images, second.levels[level].pca_images, atol=1e-5,
                                   rtol=0, msg=level)

    buffer = io.BytesIO()
    torch.save(analyzer.state_dict(), buffer)
    buffer.seek(0)
    restored = Analyzer(metrics=["token_cosine"])
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert set(restored.pca_states) == {"vision_encoder", "resampled"}
    third = restored(views, encoder, resampler)
    for level in first.levels:
        assert torch.allclose(third.levels[level].pca_images, first.levels[level].pca_images, atol=1e-6), level
    assert analyzer.state_dict()["settings"]["metrics"] == ["token_cosine"]
    Analyzer(**analyzer.settings())  # the settings round-trip into a new Analyzer (the callback relies on it)
    analyzer.reset()
    assert analyzer.pca_states == {}


def test_float32_under_bf16_autocast(pano, encoder):
    views = make_views(pano, "e2p", image_size=64)
    reference = analyze(views, encoder, nn.Linear(32, 16), metrics=NO_LPIPS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = analyze(views, encoder, nn.Linear(32, 16), metrics=NO_LPIPS)
    for level in result.levels.values():
        assert level.features.tokens.dtype == torch.float32
        assert level.pca_images.dtype == torch.float32
        assert all(isinstance(m.mean, float) for m in level.metrics.values())
    # the encoder ran in bf16 (features differ slightly), the analysis in float32 (values are close)
    for key, value in reference.scalars().items():
        if key.endswith("accuracy"):  # hit counts of ~8 tokens per pair of random features: discrete noise
            continue
        assert result.scalars()[key] == pytest.approx(value, abs=0.1), key


def test_resampler_gets_last_layer_patch_tokens():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    dino = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    patch_size=16, image_size=64)).eval()
    views = make_views(synthetic_panorama(64), "e2p", image_size=64)
    seen = []

    def resampler(x):
        seen.append(x)
        return x

    result = analyze(views, dino, resampler, layer=-2, keep_cls_token=True, metrics=["token_cosine"])
    expected = extract_features(dino, views.pixels, layer=-1).tokens
    assert result.levels["vision_encoder"].features.tokens.shape == (8, 17, 32)  # CLS kept, layer -2
    assert torch.allclose(seen[-1], expected, atol=1e-5)
    assert result.levels["vision_encoder"].pca_images.shape == (8, 3, 4, 4)  # the CLS token is not drawn
    analyze(views, dino, resampler, keep_cls_token=True, metrics=["token_cosine"])
    assert torch.allclose(seen[-1], expected, atol=1e-5)  # prefix dropped without a second forward


def test_lpips(pano, encoder, monkeypatch, tmp_path):
    views = make_views(pano, "e2p", image_size=64)
    metric = _random_lpips()
    result = analyze(views, encoder, metrics=["lpips"], lpips_metric=metric)
    lp = result.levels["vision_encoder"].metrics["lpips"]
    assert lp.skipped is None and lp.mean >= 0
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no backbone weights offline: skipped with the reason
    with pytest.warns(UserWarning, match="LPIPS is skipped"):
        analyzer = Analyzer(metrics=["lpips", "token_cosine"])
        skipped = analyzer(views, encoder).levels["vision_encoder"].metrics
    assert "not available offline" in skipped["lpips"].skipped
    assert skipped["token_cosine"].skipped is None
    first_metric = analyzer._lpips
    analyzer(views, encoder)
    assert analyzer._lpips is first_metric  # built once per Analyzer


def test_timings(pano, encoder):
    views = make_views(pano, "e2p", image_size=64)
    result = analyze(views, encoder, nn.Linear(32, 16), metrics=NO_LPIPS)
    for key in ("encoder", "resampler", "vision_encoder/pca", "vision_encoder/ssim", "resampled/hungarian_cosine",
                "total"):
        assert result.timings[key] >= 0, key
    assert result.timings["total"] >= sum(v for k, v in result.timings.items() if k != "total") * 0.99


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"metrics": ["cosine"]}, ValueError, r"Argument `metrics` must be one of \('token_cosine'"),
        ({"metrics": "ssim"}, TypeError, "Expected `metrics` to be a sequence of metric names"),
        ({"bg_removal": "pca"}, ValueError, r"Argument `bg_removal` must be one of \('threshold'"),
        ({"n_components": 0}, ValueError, r"Argument `n_components` must be in \[1, inf\]"),
        ({"n_components": 2.0}, TypeError, "Expected `n_components` to be an int"),
        ({"bg_threshold": 1.5}, ValueError, r"Argument `bg_threshold` must be in \[0, 1\]"),
        ({"layer": "last"}, TypeError, "Expected `layer` to be an int"),
        ({"keep_cls_token": 1}, TypeError, "Expected `keep_cls_token` to be a bool"),
        ({"normalize": "imagenet"}, ValueError, "Argument `normalize` must be 'auto', None or a"),
    ],
)
def test_exception_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        Analyzer(**kwargs)


def test_exception_views(encoder):
    with pytest.raises(TypeError, match="Expected `views` to be a ViewSet"):
        analyze(torch.rand(2, 3, 64, 64), encoder)


def test_letterbox_tokens_grey_and_out_of_the_pca_and_matching_references(pano, encoder):
    """anyres_e2p: the global view's letterbox tokens are drawn grey, never foreground, and do not count in
    the masked share; the matching accuracies carry their chance level and ceiling into the JSON."""
    views = make_views(pano, "anyres_e2p", image_size=64)
    result = analyze(views, encoder, metrics=["hungarian_accuracy", "nn_accuracy", "overlap_cka"],
                     bg_removal="outlier_removal")
    enc = result.levels["vision_encoder"]
    assert enc.valid is not None and not enc.valid[0].all() and enc.valid[1:].all()
    rgb = enc.pca_images.permute(0, 2, 3, 1).reshape(len(views), 16, 3)
    assert (rgb[~enc.valid] == 0.5).all() and not enc.fg_mask[~enc.valid].any()
    assert all(0.0 <= v < 0.5 for v in enc.masked_share)
    acc = enc.metrics["hungarian_accuracy"]
    assert 0 < acc.chance < 0.8 and 0 < acc.ceiling <= 1.0 and enc.metrics["nn_accuracy"].ceiling is None
    body = result.to_dict()["levels"]["vision_encoder"]
    assert body["metrics"]["hungarian_accuracy"]["chance"] == pytest.approx(acc.chance)
    assert len(body["masked_share"]) == len(views)
