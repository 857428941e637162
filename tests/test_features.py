"""Tests for panoviz_callback.features: extraction per model family, layers, grids, loading, resamplers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    AutoModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    Siglip2VisionConfig,
    Siglip2VisionModel,
)
from transformers.modeling_outputs import BaseModelOutput

from panoviz_callback.features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    TokenFeatures,
    apply_resampler,
    encoder_normalization,
    extract_features,
    load_vision_encoder,
)

ATOL = 1e-5
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
TEXT = {**SMALL, "num_hidden_layers": 1, "vocab_size": 64, "max_position_embeddings": 16}


def _build(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(**SMALL, patch_size=16, image_size=64))
    elif family == "siglip2":
        model = Siglip2VisionModel(Siglip2VisionConfig(**SMALL, patch_size=16, num_patches=16))
    elif family == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**SMALL, patch_size=16, image_size=64))
    elif family == "clip_proj":
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**SMALL, patch_size=16, image_size=64, projection_dim=8))
    elif family == "dinov2":
        model = Dinov2Model(Dinov2Config(**SMALL, patch_size=14, image_size=56))
    elif family == "dinov2_reg":
        model = Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(**SMALL, patch_size=14, image_size=56, num_register_tokens=4)
        )
    else:
        raise KeyError(family)
    return model.eval()


# family -> (view size, prefix tokens, normalisation)
FAMILIES = {
    "siglip": (64, 0, ((0.5,) * 3, (0.5,) * 3)),
    "siglip2": (64, 0, ((0.5,) * 3, (0.5,) * 3)),
    "clip": (64, 1, (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)),
    "clip_proj": (64, 1, (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)),
    "dinov2": (56, 1, (IMAGENET_MEAN, IMAGENET_STD)),
    "dinov2_reg": (56, 5, (IMAGENET_MEAN, IMAGENET_STD)),
}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {name: _build(name) for name in FAMILIES}


def _pixels(v: int = 3, h: int = 64, w: int | None = None, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(v, 3, h, h if w is None else w, generator=gen)


def _normed(pixels: torch.Tensor, stats) -> torch.Tensor:
    mean = torch.tensor(stats[0]).view(1, 3, 1, 1)
    std = torch.tensor(stats[1]).view(1, 3, 1, 1)
    return (pixels - mean) / std


def _raw(model: nn.Module, family: str, pixels: torch.Tensor, **kwargs):
    """The model's own output on manually normalised pixels (the reference)."""
    x = _normed(pixels, FAMILIES[family][2])
    if family == "siglip2":
        from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

        p = model.config.patch_size
        gh, gw = x.shape[-2] // p, x.shape[-1] // p
        patches = torch.stack([convert_image_to_patches(img, p) for img in x])
        return model(
            pixel_values=patches, pixel_attention_mask=torch.ones(len(x), gh * gw, dtype=torch.int32),
            spatial_shapes=torch.tensor([[gh, gw]] * len(x)), **kwargs,
        )
    return model(pixel_values=x, **kwargs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cardinality(models, family):
    size, prefix, _ = FAMILIES[family]
    pixels = _pixels(h=size)
    grid = size // models[family].config.patch_size
    feats = extract_features(models[family], pixels)
    assert feats.tokens.shape == (3, grid * grid, 32)
    assert feats.tokens.dtype == torch.float32
    assert feats.grid_hw == (grid, grid)
    assert feats.num_prefix_tokens == prefix
    assert feats.layout == "grid"
    kept = extract_features(models[family], pixels, keep_cls_token=True)
    assert kept.tokens.shape == (3, prefix + grid * grid, 32)
    assert kept.num_prefix_tokens == prefix
    torch.testing.assert_close(kept.tokens[:, prefix:], feats.tokens)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_last_layer_is_last_hidden_state(models, family):
    size, prefix, _ = FAMILIES[family]
    pixels = _pixels(h=size)
    ref = _raw(models[family], family, pixels, output_hidden_states=True)
    feats = extract_features(models[family], pixels, layer=-1, keep_cls_token=True)
    torch.testing.assert_close(feats.tokens, ref.last_hidden_state, atol=ATOL, rtol=0)
    # SigLIP's post_layernorm and DINOv2's final layernorm make the last state differ from the
    # last block's output; CLIP applies its post_layernorm to the pooled output only.
    differs = not torch.allclose(ref.last_hidden_state, ref.hidden_states[-1], atol=1e-3)
    assert differs == (family not in ("clip", "clip_proj"))


@pytest.mark.parametrize("family", ["siglip", "clip", "dinov2_reg", "siglip2"])
def test_layer_positive_negative_agree(models, family):
    size, _, _ = FAMILIES[family]
    pixels = _pixels(h=size)
    n_layers = models[family].config.num_hidden_layers
    ref = _raw(models[family], family, pixels, output_hidden_states=True)
    for k in range(n_layers):
        pos = extract_features(models[family], pixels, layer=k, keep_cls_token=True)
        neg = extract_features(models[family], pixels, layer=k - (n_layers + 1), keep_cls_token=True)
        torch.testing.assert_close(pos.tokens, neg.tokens)
        torch.testing.assert_close(pos.tokens, ref.hidden_states[k], atol=ATOL, rtol=0)
    # layer=L is the last block's output before the final norm, layer=-1 the last_hidden_state
    last_block = extract_features(models[family], pixels, layer=n_layers, keep_cls_token=True)
    torch.testing.assert_close(last_block.tokens, ref.hidden_states[-1], atol=ATOL, rtol=0)


def test_layer_zero_is_embeddings(models):
    pixels = _pixels()
    feats = extract_features(models["siglip"], pixels, layer=0)
    expected = models["siglip"].embeddings(_normed(pixels, FAMILIES["siglip"][2]))
    torch.testing.assert_close(feats.tokens, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layer", [3, -4, 100])
def test_exception_layer_out_of_range(models, layer):
    with pytest.raises(ValueError, match=r"`layer` must be in \[-3, 2\] for SiglipVisionModel with 2 layers"):
        extract_features(models["siglip"], _pixels(), layer=layer)


@pytest.mark.parametrize("family", ["dinov2", "dinov2_reg"])
def test_non_square_grid_dinov2(models, family):
    pixels = _pixels(v=2, h=56, w=84)
    feats = extract_features(models[family], pixels)
    assert feats.grid_hw == (4, 6)
    assert feats.tokens.shape == (2, 24, 32)
    ref = _raw(models[family], family, pixels)
    torch.testing.assert_close(feats.tokens, ref.last_hidden_state[:, FAMILIES[family][1]:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["siglip", "clip", "siglip2"])
def test_non_square_grid_interpolated(models, family):
    pixels = _pixels(v=2, h=64, w=96)
    feats = extract_features(models[family], pixels)
    assert feats.grid_hw == (4, 6)
    assert feats.tokens.shape == (2, 24, 32)
    kwargs = {} if family == "siglip2" else {"interpolate_pos_encoding": True}
    ref = _raw(models[family], family, pixels, **kwargs)
    torch.testing.assert_close(feats.tokens, ref.last_hidden_state[:, FAMILIES[family][1]:], atol=ATOL, rtol=0)


def test_siglip2_needs_divisible_views(models):
    with pytest.raises(ValueError, match="divisible by the patch size 16"):
        extract_features(models["siglip2"], _pixels(h=60))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_normalization_auto(models, family):
    size, prefix, stats = FAMILIES[family]
    assert encoder_normalization(models[family]) == stats
    pixels = _pixels(h=size)
    feats = extract_features(models[family], pixels)
    ref = _raw(models[family], family, pixels)
    torch.testing.assert_close(feats.tokens, ref.last_hidden_state[:, prefix:], atol=ATOL, rtol=0)


def test_normalization_explicit_and_none(models):
    model, pixels = models["siglip"], _pixels()
    stats = ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    explicit = extract_features(model, pixels, normalize=stats)
    torch.testing.assert_close(explicit.tokens, model(pixel_values=_normed(pixels, stats)).last_hidden_state)
    scalar = extract_features(model, pixels, normalize=(0.5, 0.5))
    torch.testing.assert_close(scalar.tokens, extract_features(model, pixels).tokens)
    raw = extract_features(model, pixels * 4 - 2, normalize=None)  # already normalised: no range check
    torch.testing.assert_close(raw.tokens, model(pixel_values=pixels * 4 - 2).last_hidden_state)


def test_exception_normalization(models):
    with pytest.raises(ValueError, match=r"Expected `pixels` in \[0, 1\].*normalize=None"):
        extract_features(models["siglip"], _pixels() * 2 - 1)
    with pytest.raises(ValueError, match="Argument `normalize` must be one of"):
        extract_features(models["siglip"], _pixels(), normalize="imagenet")
    with pytest.raises(ValueError, match="std to be positive"):
        extract_features(models["siglip"], _pixels(), normalize=(0.5, 0.0))


@pytest.mark.parametrize("full", ["siglip", "clip"])
def test_full_model_uses_vision_tower(full):
    torch.manual_seed(0)
    vision = {**SMALL, "patch_size": 16, "image_size": 64}
    if full == "siglip":
        model = SiglipModel(SiglipConfig(vision_config=vision, text_config=TEXT)).eval()
    else:
        model = CLIPModel(CLIPConfig(vision_config=vision, text_config=TEXT)).eval()
    pixels = _pixels()
    feats = extract_features(model, pixels, layer=-2)
    torch.testing.assert_close(feats.tokens, extract_features(model.vision_model, pixels, layer=-2).tokens)
    assert feats.num_prefix_tokens == (1 if full == "clip" else 0)
    assert encoder_normalization(model) == encoder_normalization(model.vision_model)


def test_keeps_modes_and_grad_mode(models):
    model = models["dinov2"]
    model.train()
    try:
        with torch.no_grad():
            feats = extract_features(model, _pixels(h=56))
        assert model.training and not feats.tokens.requires_grad
        feats = extract_features(model, _pixels(h=56))
        assert feats.tokens.requires_grad  # grad mode is the caller's
    finally:
        model.eval()


def test_bfloat16_model_gives_float32(models):
    model = _build("siglip").to(torch.bfloat16)
    feats = extract_features(model, _pixels())
    assert feats.tokens.dtype == torch.float32
    torch.testing.assert_close(feats.tokens, extract_features(models["siglip"], _pixels()).tokens, atol=0.1, rtol=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = extract_features(models["clip"], _pixels())
    assert autocast.tokens.dtype == torch.float32


def test_exception_wrong_view_count():
    with pytest.raises(ValueError, match="to return tokens for 3 views, got 1"):
        extract_features(lambda x: x[:1].flatten(2).transpose(1, 2), _pixels(h=4), grid_hw=(4, 4))


# generic encoders ---------------------------------------------------------------------------


class PatchEncoder(nn.Module):
    """A conv patchifier with an optional CLS token, like a minimal ViT."""

    def __init__(self, patch_size=8, cls=False, declare=True, output="tensor"):
        super().__init__()
        self.proj = nn.Conv2d(3, 16, patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.randn(1, 1, 16)) if cls else None
        self.output = output
        if declare:
            self.patch_size = patch_size
            self.num_prefix_tokens = int(cls)

    def forward(self, x, output_hidden_states=False):
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (V, N, D)
        if self.cls is not None:
            tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1)
        if self.output == "tuple":
            return (tokens, tokens.mean(1))
        if self.output == "model_output":
            states = (tokens * 0, tokens * 2, tokens) if output_hidden_states else None
            return BaseModelOutput(last_hidden_state=tokens, hidden_states=states)
        return tokens


def test_generic_callable_square_fallback():
    pixels = _pixels(v=2, h=32)
    feats = extract_features(lambda x: x[:, :, ::8, ::8].flatten(2).transpose(1, 2), pixels)
    assert feats.grid_hw == (4, 4) and feats.num_prefix_tokens == 0
    assert feats.tokens.shape == (2, 16, 3)
    torch.testing.assert_close(feats.tokens[:, 5], pixels[:, :, 8, 8])  # row 1, column 1: raw pixels
    wide = extract_features(lambda x: x[:, :, ::8, ::8].flatten(2).transpose(1, 2), _pixels(v=2, h=32, w=48))
    assert wide.grid_hw == (4, 6)


@pytest.mark.parametrize("output", ["tensor", "tuple", "model_output"])
def test_generic_module_outputs(output):
    torch.manual_seed(0)
    enc = PatchEncoder(cls=True, output=output)
    pixels = _pixels(v=2, h=32, w=48)
    feats = extract_features(enc, pixels)
    assert feats.grid_hw == (4, 6) and feats.num_prefix_tokens == 1
    assert feats.tokens.shape == (2, 24, 16)
    torch.testing.assert_close(feats.tokens, enc.proj(pixels).flatten(2).transpose(1, 2))
    assert extract_features(enc, pixels, keep_cls_token=True).tokens.shape == (2, 25, 16)


def test_generic_hidden_states_layer():
    enc = PatchEncoder(output="model_output")
    pixels = _pixels(v=2, h=32)
    last = extract_features(enc, pixels).tokens
    torch.testing.assert_close(extract_features(enc, pixels, layer=1).tokens, last * 2)
    torch.testing.assert_close(extract_features(enc, pixels, layer=-2).tokens, last * 2)
    with pytest.raises(ValueError, match=r"`layer` must be in \[-3, 2\]"):
        extract_features(enc, pixels, layer=3)
    with pytest.raises(ValueError, match="needs an encoder that returns hidden states"):
        extract_features(lambda x: x.flatten(2).transpose(1, 2), pixels, layer=0)


def test_generic_normalization_attributes():
    enc = PatchEncoder()
    pixels = _pixels(v=2, h=32)
    plain = extract_features(enc, pixels).tokens  # no attributes: no normalisation
    torch.testing.assert_close(plain, enc(pixels))
    assert encoder_normalization(enc) is None
    enc.image_mean, enc.image_std = [0.2, 0.3, 0.4], [0.5, 0.5, 0.5]
    assert encoder_normalization(enc) == ((0.2, 0.3, 0.4), (0.5, 0.5, 0.5))
    normed = extract_features(enc, pixels).tokens
    torch.testing.assert_close(normed, enc(_normed(pixels, ((0.2, 0.3, 0.4), (0.5,) * 3))))


def test_generic_grid_argument_and_errors():
    enc = PatchEncoder(cls=True, declare=False)  # a CLS token nobody declared
    pixels = _pixels(v=2, h=32)
    with pytest.raises(ValueError, match=r"Cannot infer the token grid.*17 tokens"):
        extract_features(enc, pixels)
    enc.patch_size = 8
    with pytest.raises(ValueError, match=r"returned 17 tokens, but 32x32 views with patch size 8x8 give a 4x4 grid"):
        extract_features(enc, pixels)
    enc.num_prefix_tokens = 1
    assert extract_features(enc, pixels).grid_hw == (4, 4)
    feats = extract_features(PatchEncoder(declare=False), _pixels(v=2, h=32, w=64), grid_hw=(4, 8))
    assert feats.grid_hw == (4, 8)
    with pytest.raises(ValueError, match="give a 2x8 grid"):
        extract_features(PatchEncoder(declare=False), _pixels(v=2, h=32, w=64), grid_hw=(2, 8))
    with pytest.raises(ValueError, match="Expected `grid_hw` to be two positive ints"):
        extract_features(enc, pixels, grid_hw=(4, 0))


def test_exception_inputs(models):
    with pytest.raises(ValueError, match=r"Expected `pixels` of shape \(V, 3, h, w\), got \(3, 64, 64\)"):
        extract_features(models["siglip"], torch.rand(3, 64, 64))
    with pytest.raises(TypeError, match="Expected `pixels` to be a torch.Tensor"):
        extract_features(models["siglip"], [[0.5]])
    with pytest.raises(TypeError, match="Expected `encoder` to be a module or callable"):
        extract_features("siglip", _pixels())
    with pytest.raises(TypeError, match="Expected `layer` to be an int"):
        extract_features(models["siglip"], _pixels(), layer=1.0)
    with pytest.raises(TypeError, match="to return a \\(V, N, D\\) tensor"):
        extract_features(lambda x: {"logits": x}, _pixels())


# loading ------------------------------------------------------------------------------------


def test_load_tiny_preset_deterministic():
    torch.manual_seed(123)
    a = load_vision_encoder("tiny")
    torch.manual_seed(123)
    b = load_vision_encoder("tiny")
    assert isinstance(a, SiglipVisionModel) and not a.training
    config = a.config
    assert (config.hidden_size, config.num_hidden_layers, config.patch_size, config.image_size) == (64, 2, 16, 224)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    small = load_vision_encoder("tiny", image_size=128)
    feats = extract_features(small, _pixels(v=2, h=128))
    assert feats.grid_hw == (8, 8) and feats.tokens.shape == (2, 64, 64)


def test_load_from_config_object_and_dict():
    config = Dinov2WithRegistersConfig(**SMALL, patch_size=14, image_size=56, num_register_tokens=4)
    model = load_vision_encoder(config, image_size=28)
    assert isinstance(model, Dinov2WithRegistersModel) and model.config.image_size == 28
    assert config.image_size == 56  # the caller's config is left alone
    from_dict = load_vision_encoder({"model_type": "clip_vision_model", **SMALL, "patch_size": 16, "image_size": 64})
    assert isinstance(from_dict, CLIPVisionModel)
    full = load_vision_encoder(SiglipConfig(vision_config={**SMALL, "patch_size": 16}, text_config=TEXT))
    assert isinstance(full, SiglipVisionModel) and full.config.hidden_size == 32


@pytest.mark.parametrize("family", ["siglip", "dinov2_reg", "siglip2"])
def test_back_and_forth_save_pretrained(models, family, tmp_path):
    models[family].save_pretrained(tmp_path)
    loaded = load_vision_encoder(tmp_path)
    assert type(loaded) is type(models[family]) and not loaded.training
    pixels = _pixels(h=FAMILIES[family][0])
    torch.testing.assert_close(extract_features(loaded, pixels).tokens, extract_features(models[family], pixels).tokens)
    blank = load_vision_encoder(str(tmp_path), pretrained=False)
    assert type(blank) is type(models[family])


@pytest.mark.parametrize("full", ["siglip", "clip"])
def test_back_and_forth_full_model_folder(full, tmp_path, recwarn):
    torch.manual_seed(0)
    vision = {**SMALL, "patch_size": 16, "image_size": 64}
    if full == "siglip":
        model = SiglipModel(SiglipConfig(vision_config=vision, text_config=TEXT))
    else:
        model = CLIPModel(CLIPConfig(vision_config=vision, text_config=TEXT))
    model.save_pretrained(tmp_path)
    loaded = load_vision_encoder(tmp_path)
    assert type(loaded) is type(model.vision_model)
    for name, value in model.vision_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert not [w for w in recwarn if "missing" in str(w.message)]


def test_exception_uncached_hub_name(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ValueError, match=r"'nonexistent-org/definitely-not-cached' is not in the local Hugging Face "
                                         r"cache and this machine cannot download it; pass a local folder saved with "
                                         r"save_pretrained"):
        load_vision_encoder("nonexistent-org/definitely-not-cached")


def test_exception_load(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        load_vision_encoder(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no config.json"):
        load_vision_encoder(tmp_path)
    with pytest.raises(ValueError, match="'model_type' key"):
        load_vision_encoder({"hidden_size": 32})
    with pytest.raises(ValueError, match="Unknown option `image_sise`"):
        load_vision_encoder("tiny", image_sise=64)
    with pytest.raises(TypeError, match="Expected `spec` to be 'tiny'"):
        load_vision_encoder(3)


# resampler ----------------------------------------------------------------------------------


class Pool2x2(nn.Module):
    def __init__(self, grid_hw):
        super().__init__()
        self.grid_hw = grid_hw

    def forward(self, tokens):
        v, _, d = tokens.shape
        grid = tokens.transpose(1, 2).reshape(v, d, *self.grid_hw)  # (V, D, gh, gw)
        return nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)  # (V, gh*gw/4, D)


class QueryResampler(nn.Module):
    def __init__(self, num_queries=5, dim=8):
        super().__init__()
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, dim))

    def forward(self, tokens):
        attn = torch.softmax(self.queries @ tokens.transpose(1, 2), dim=-1)  # (V, Q, N)
        return BaseModelOutput(last_hidden_state=attn @ tokens)


class SmallPerceiver(QueryResampler):
    def __init__(self, num_queries=16):
        super().__init__(num_queries)
        del self.num_queries


def _feats(grid=(4, 6), prefix=0, keep=False, dim=8):
    tokens = torch.randn(2, prefix * keep + grid[0] * grid[1], dim, generator=torch.Generator().manual_seed(0))
    return TokenFeatures(tokens, grid, prefix, "grid")


def test_resampler_identity_keeps_grid():
    out = apply_resampler(nn.Identity(), _feats())
    assert out.layout == "grid" and out.grid_hw == (4, 6) and out.num_prefix_tokens == 0
    torch.testing.assert_close(out.tokens, _feats().tokens)


def test_resampler_drops_kept_prefix():
    feats = _feats(prefix=1, keep=True)
    out = apply_resampler(nn.Identity(), feats)
    torch.testing.assert_close(out.tokens, feats.tokens[:, 1:])
    assert out.grid_hw == (4, 6)


def test_resampler_pooled_grid():
    out = apply_resampler(Pool2x2((4, 6)), _feats())
    assert out.layout == "grid" and out.grid_hw == (2, 3) and out.tokens.shape == (2, 6, 8)
    odd = apply_resampler(Pool2x2((5, 5)), _feats(grid=(5, 5)))  # floor pooling 5x5 -> 2x2
    assert odd.grid_hw == (2, 2)


def test_resampler_queries():
    out = apply_resampler(QueryResampler(num_queries=5), _feats())
    assert out.layout == "queries" and out.grid_hw is None and out.tokens.shape == (2, 5, 8)
    # declared queries win even when M happens to equal N or a pooled grid
    assert apply_resampler(QueryResampler(num_queries=24), _feats()).layout == "queries"
    assert apply_resampler(SmallPerceiver(num_queries=6), _feats()).layout == "queries"
    assert apply_resampler(lambda t: t[:, :7], _feats()).layout == "queries"  # 7 fits no grid


def test_resampler_layout_override():
    forced = apply_resampler(nn.Identity(), _feats(), layout="queries")
    assert forced.layout == "queries" and forced.grid_hw is None
    grid = apply_resampler(QueryResampler(num_queries=6), _feats(), layout="grid")
    assert grid.grid_hw == (2, 3)
    declared = QueryResampler(num_queries=6)
    declared.output_layout = "grid"
    assert apply_resampler(declared, _feats()).grid_hw == (2, 3)


def test_resampler_tuple_output_and_dtype():
    class Half(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 4).to(torch.bfloat16)

        def forward(self, tokens):
            return self.proj(tokens), None

    out = apply_resampler(Half(), _feats())
    assert out.tokens.dtype == torch.float32 and out.tokens.shape == (2, 24, 4) and out.grid_hw == (4, 6)


def test_exception_resampler():
    with pytest.raises(ValueError, match="Argument `layout` must be one of"):
        apply_resampler(nn.Identity(), _feats(), layout="square")
    with pytest.raises(ValueError, match="`layout` is 'grid' but .* returned 7 tokens"):
        apply_resampler(lambda t: t[:, :7], _feats(), layout="grid")
    with pytest.raises(TypeError, match="Expected `features` to be TokenFeatures"):
        apply_resampler(nn.Identity(), torch.rand(2, 4, 8))
    with pytest.raises(ValueError, match=r"Expected `.* output` of shape \(V, M, D\)"):
        apply_resampler(lambda t: t.mean(1), _feats())


def test_end_to_end_tiny_encoder_and_pool():
    torch.manual_seed(0)
    encoder = load_vision_encoder("tiny", image_size=64)
    feats = extract_features(encoder, _pixels(v=4, h=64))
    pooled = apply_resampler(Pool2x2(feats.grid_hw), feats)
    assert feats.tokens.shape == (4, 16, 64) and pooled.grid_hw == (2, 2)
    assert torch.isfinite(pooled.tokens).all()
    assert isinstance(AutoModel.from_config(encoder.config), SiglipVisionModel)
