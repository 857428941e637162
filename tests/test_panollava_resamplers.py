"""PanoLLaVA resamplers: exact key layouts load strictly, outputs equal hand-written references.

Key names and shapes below are PanoLLaVA's own (read from its source at HEAD / dc64bc5 /
7227614); the references recompute each layer with plain tensor algebra in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _panollava_refs import gelu, layer_norm, linear, random_weights, silu

from panoviz_callback.panollava.resamplers import (
    RESAMPLER_TYPES,
    build_panollava_resampler,
    canonical_resampler_type,
)

ATOL = 1e-5
D, L = 8, 6  # encoder width, latent width


def _tokens(v: int = 2, n: int = 17, d: int = D, seed: int = 1) -> torch.Tensor:
    return torch.randn(v, n, d, generator=torch.Generator().manual_seed(seed))


def _build(rtype: str, shapes: dict[str, tuple[int, ...]], config=None, revision="head", d=D, latent=L):
    sd = random_weights(shapes)
    module = build_panollava_resampler(rtype, vision_dim=d, latent_dim=latent, config=config, revision=revision,
                                       state_dict=sd)
    module.load_state_dict(sd, strict=True)
    return module, sd


def _mlp_keys(widths: list[int], use_ln: bool, prefix: str = "mlp") -> dict[str, tuple[int, ...]]:
    keys, idx = {}, 0
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        keys[f"{prefix}.{idx}.weight"], keys[f"{prefix}.{idx}.bias"] = (b, a), (b,)
        last = i == len(widths) - 2
        if use_ln and not last:
            keys[f"{prefix}.{idx + 1}.weight"], keys[f"{prefix}.{idx + 1}.bias"] = (b,), (b,)
        idx += 1 if last else (3 if use_ln else 2)
    return keys


def _mlp_ref(x, sd, idx: list[int], ln_idx: list[int], prefix="mlp", ln_eps=1e-5):
    h = x.double()
    for j, i in enumerate(idx):
        h = linear(h, sd, f"{prefix}.{i}")
        if j < len(idx) - 1:
            if ln_idx:
                h = layer_norm(h, sd[f"{prefix}.{ln_idx[j]}.weight"], sd[f"{prefix}.{ln_idx[j]}.bias"], ln_eps)
            h = gelu(h)
    return h


# ---------------------------------------------------------------- builder


def test_types_per_revision():
    assert set(RESAMPLER_TYPES["head"]) == {"mlp", "bimamba", "qformer", "perceiver", "spatial_pool", "masked_drop",
                                            "c_abstractor", "identity", "avg", "conv"}
    assert RESAMPLER_TYPES["dc64bc5"] == ("mlp", "bimamba", "qformer")
    assert RESAMPLER_TYPES["7227614"] == ("mlp",)
    assert canonical_resampler_type("bi_mamba") == "bimamba"
    assert canonical_resampler_type("cabstractor", "aa3e2ae") == "c_abstractor"


@pytest.mark.parametrize(("rtype", "revision", "match"), [
    ("perceiver", "dc64bc5", r"not one PanoLLaVA builds at revision 'dc64bc5'; supported: mlp, bimamba, qformer\."),
    ("qformer", "7227614", r"supported: mlp\."),
    ("cabstractor", "dc64bc5", r"'cabstractor'"),
    ("transformer", "head", r"'transformer' is not one"),
    ("mlp", "v2", r"Unknown PanoLLaVA revision 'v2'"),
])
def test_exception_unknown(rtype, revision, match):
    with pytest.raises(ValueError, match=match):
        build_panollava_resampler(rtype, vision_dim=D, latent_dim=L, revision=revision)


def test_exception_weights():
    sd = random_weights(_mlp_keys([D, 12, L], use_ln=True))
    with pytest.raises(ValueError, match=r"take 8-dim tokens, but the encoder's hidden size is 10\."):
        build_panollava_resampler("mlp", vision_dim=10, latent_dim=L, state_dict=sd)
    with pytest.raises(ValueError, match=r"give 6-dim tokens, but `latent_dimension` is 7\."):
        build_panollava_resampler("mlp", vision_dim=D, latent_dim=7, state_dict=sd)
    with pytest.raises(ValueError, match=r"Expected the key 'input_proj.weight' in the c_abstractor"):
        build_panollava_resampler("c_abstractor", vision_dim=D, latent_dim=L, state_dict=sd)
    with pytest.raises(TypeError, match="mapping"):
        build_panollava_resampler("mlp", vision_dim=D, latent_dim=L, config=[("depth", 2)])


def test_defaults_per_revision():
    head = build_panollava_resampler("mlp", vision_dim=D, latent_dim=L)
    assert (head.depth, head.hidden_dim, head.use_ln) == (3, D, True)
    dc_flat = build_panollava_resampler("mlp", vision_dim=D, latent_dim=L, revision="dc64bc5")
    assert (dc_flat.depth, dc_flat.hidden_dim) == (3, 1536)  # RESAMPLER_CONFIGS["mlp"]
    dc_typed = build_panollava_resampler("mlp", vision_dim=D, latent_dim=L, revision="dc64bc5",
                                         config={"resampler_config": {"hidden_dim": 12}})
    assert (dc_typed.depth, dc_typed.hidden_dim) == (2, 12)  # pydantic default depth 2
    old = build_panollava_resampler("mlp", vision_dim=D, latent_dim=L, revision="7227614",
                                    config={"resampler_use_ln": False})
    assert (old.depth, old.hidden_dim, old.use_ln) == (2, D, False)
    q = build_panollava_resampler("qformer", vision_dim=D, latent_dim=L, revision="dc64bc5",
                                  config={"resampler_num_query_tokens": 3, "resampler_num_hidden_layers": 1,
                                          "resampler_attention_heads": 2})
    assert (q.num_queries, q.num_hidden_layers, q.num_attention_heads) == (3, 1, 8)  # heads fixed at 8
    bm = build_panollava_resampler("bimamba", vision_dim=D, latent_dim=L, revision="dc64bc5",
                                   config={"resampler_depth": 1, "resampler_hidden_dim": 16})
    assert (bm.num_layers, bm.hidden_dim, bm.blocks[0].forward_block.d_inner) == (1, 16, 28)  # expand 1.75
    assert not build_panollava_resampler("mlp", vision_dim=D, latent_dim=L).training


# ---------------------------------------------------------------- mlp


@pytest.mark.parametrize("revision", ["head", "dc64bc5", "7227614"])
@pytest.mark.parametrize("use_ln", [True, False])
def test_mlp_keys_and_values(revision, use_ln):
    shapes = _mlp_keys([D, 12, 12, L], use_ln)
    expected = ({"mlp.0.weight", "mlp.1.weight", "mlp.3.weight", "mlp.4.weight", "mlp.6.weight"} if use_ln
                else {"mlp.0.weight", "mlp.2.weight", "mlp.4.weight"})
    assert {k for k in shapes if k.endswith("weight")} == expected
    module, sd = _build("mlp", shapes, revision=revision)
    x = _tokens()
    ref = _mlp_ref(x, sd, [0, 3, 6] if use_ln else [0, 2, 4], [1, 4] if use_ln else [])
    torch.testing.assert_close(module(x).double(), ref, atol=ATOL, rtol=0)
    assert module.output_grid((4, 4), num_prefix_tokens=1) == (4, 4)
    assert module.output_prefix_tokens(1) == 1


@pytest.mark.parametrize("pool_type", ["avg", "max"])
def test_mlp_pool_tokens_pools_the_sequence(pool_type):
    module, sd = _build("mlp", _mlp_keys([D, L], use_ln=True), config={"pool_tokens": 5, "pool_type": pool_type})
    x = _tokens(n=17)  # CLS + 4 x 4
    y = linear(x, sd, "mlp.0")  # (V, 17, L)
    bins = [(math.floor(i * 17 / 5), math.ceil((i + 1) * 17 / 5)) for i in range(5)]  # adaptive 1-D bins
    red = (lambda t: t.mean(1)) if pool_type == "avg" else (lambda t: t.amax(1))
    ref = torch.stack([red(y[:, a:b]) for a, b in bins], dim=1)
    torch.testing.assert_close(module(x).double(), ref, atol=ATOL, rtol=0)
    assert module.output_grid((4, 4), num_prefix_tokens=1) is None


def test_mlp_pool_tokens_grid():
    module = build_panollava_resampler("mlp", vision_dim=D, latent_dim=L, config={"pool_tokens": 8})
    assert module.output_grid((4, 4)) == (4, 2)  # runs of 2 tokens inside rows
    module.pool_tokens = 2
    assert module.output_grid((4, 4)) == (2, 1)  # runs of two whole rows
    module.pool_tokens = 16
    assert module.output_grid((4, 4)) == (4, 4)  # no pooling when pool_tokens >= N
    module.pool_tokens = 6
    assert module.output_grid((4, 4)) is None


# ---------------------------------------------------------------- identity / avg / conv


def test_identity_and_avg():
    ident, sd = _build("identity", {"proj.weight": (L, D), "proj.bias": (L,)})
    x = _tokens()
    torch.testing.assert_close(ident(x).double(), linear(x, sd, "proj"), atol=ATOL, rtol=0)
    avg, sd = _build("avg", {"proj.weight": (L, D), "proj.bias": (L,)})
    torch.testing.assert_close(avg(x).double(), linear(x.double().mean(1, keepdim=True), sd, "proj"), atol=ATOL,
                               rtol=0)
    assert avg.output_grid((4, 4), 1) == (1, 1)


def _convnext_keys(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.dwconv.weight": (c, 1, 7, 7), f"{prefix}.dwconv.bias": (c,), f"{prefix}.norm.weight": (c,),
            f"{prefix}.norm.bias": (c,), f"{prefix}.pwconv1.weight": (4 * c, c), f"{prefix}.pwconv1.bias": (4 * c,),
            f"{prefix}.pwconv2.weight": (c, 4 * c), f"{prefix}.pwconv2.bias": (c,)}


def test_conv_convnext():
    shapes = {"input_proj.weight": (L, D), "input_proj.bias": (L,), "norm.weight": (L,), "norm.bias": (L,),
              "head.weight": (L, L), "head.bias": (L,)}
    for stage, depth in enumerate([2, 1]):
        for b in range(depth):
            shapes |= _convnext_keys(f"repeated_stages.0.{stage}.{b}", L)
    module, sd = _build("conv", shapes)
    assert module.depths == (2, 1)
    x = _tokens(n=7)  # 3 x 3 grid with 2 zero tokens
    h = linear(x, sd, "input_proj")
    h = torch.cat([h, h.new_zeros(2, 2, L)], 1).view(2, 3, 3, L).permute(0, 3, 1, 2)
    for stage, depth in enumerate([2, 1]):
        for b in range(depth):
            p = f"repeated_stages.0.{stage}.{b}"
            y = F.conv2d(h, sd[f"{p}.dwconv.weight"].double(), sd[f"{p}.dwconv.bias"].double(), padding=3, groups=L)
            y = layer_norm(y.permute(0, 2, 3, 1), sd[f"{p}.norm.weight"], sd[f"{p}.norm.bias"], 1e-6)
            y = linear(gelu(linear(y, sd, f"{p}.pwconv1")), sd, f"{p}.pwconv2")
            h = h + y.permute(0, 3, 1, 2)
    h = h.permute(0, 2, 3, 1).reshape(2, 9, L)[:, :7]
    ref = linear(layer_norm(h, sd["norm.weight"], sd["norm.bias"], 1e-6).mean(1, keepdim=True), sd, "head")
    torch.testing.assert_close(module(x).double(), ref, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- spatial_pool / masked_drop


def _proj_keys(depth: int, d: int = D, latent: int = L) -> dict[str, tuple[int, ...]]:
    if depth == 0:
        return {"proj.weight": (latent, d), "proj.bias": (latent,)}
    return _mlp_keys([d] + [max(d, latent)] * (depth - 1) + [latent], use_ln=True, prefix="proj")


def _proj_ref(x, sd, depth):
    if depth == 0:
        return linear(x, sd, "proj")
    return _mlp_ref(x, sd, [3 * i for i in range(depth)], [3 * i + 1 for i in range(depth - 1)], "proj")


@pytest.mark.parametrize(("mode", "depth"), [("average", 2), ("max", 1), ("conv", 0)])
def test_spatial_pool(mode, depth):
    shapes = _proj_keys(depth)
    if mode == "conv":
        shapes |= {"pool.weight": (D, D, 2, 2), "pool.bias": (D,)}
    module, sd = _build("spatial_pool", shapes, config={"pool_size": 2, "pool_mode": mode})
    x = _tokens(n=17)  # CLS + 16 -> PanoLLaVA's grid 5 x 4 (3 zero tokens)
    grid = torch.cat([x, x.new_zeros(2, 3, D)], 1).view(2, 5, 4, D).permute(0, 3, 1, 2).double()
    if mode == "average":
        pooled = F.avg_pool2d(grid, 2)
    elif mode == "max":
        pooled = F.max_pool2d(grid, 2)
    else:
        pooled = F.conv2d(grid, sd["pool.weight"].double(), sd["pool.bias"].double(), stride=2)
    ref = _proj_ref(pooled.flatten(2).transpose(1, 2), sd, depth)
    out = module(x)
    assert out.shape == (2, 4, L)
    torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=0)
    assert module.output_grid((4, 4), num_prefix_tokens=1) is None  # CLS shifts PanoLLaVA's reshape
    assert module.output_grid((4, 4)) == (2, 2)
    assert module.output_grid((2, 8)) is None  # PanoLLaVA assumes a square grid


def test_masked_drop_eval_and_train():
    module, sd = _build("masked_drop", _proj_keys(2), config={"mask_ratio": 0.25})
    x = _tokens(n=17)
    torch.testing.assert_close(module(x).double(), _proj_ref(x, sd, 2), atol=ATOL, rtol=0)
    assert module.output_grid((4, 4), 1) == (4, 4)
    module.train()
    torch.manual_seed(0)
    kept = module(x)
    assert kept.shape == (2, 4, L)  # max(1, int(17 * 0.25))
    full = module.proj(x)
    assert all(any(torch.allclose(row, f) for f in full[v]) for v in range(2) for row in kept[v])


# ---------------------------------------------------------------- c_abstractor


def _spatial_block_keys(p: str, c: int, expand: int, mid: int, k: int) -> dict[str, tuple[int, ...]]:
    inner = c * expand
    return {f"{p}.dwconv.weight": (c, 1, k, k), f"{p}.dwconv.bias": (c,), f"{p}.norm.norm.weight": (c,),
            f"{p}.norm.norm.bias": (c,), f"{p}.pw1.weight": (inner, c, 1, 1), f"{p}.pw1.bias": (inner,),
            f"{p}.se.fc.0.weight": (mid, inner), f"{p}.se.fc.0.bias": (mid,), f"{p}.se.fc.2.weight": (inner, mid),
            f"{p}.se.fc.2.bias": (inner,), f"{p}.pw2.weight": (c, inner, 1, 1), f"{p}.pw2.bias": (c,)}


def _spatial_block_ref(h, sd, p, k):
    c = h.shape[1]
    y = F.conv2d(h, sd[f"{p}.dwconv.weight"].double(), sd[f"{p}.dwconv.bias"].double(), padding=k // 2, groups=c)
    y = layer_norm(y.permute(0, 2, 3, 1), sd[f"{p}.norm.norm.weight"], sd[f"{p}.norm.norm.bias"], 1e-6)
    y = silu(torch.einsum("vhwc,oc->vhwo", y, sd[f"{p}.pw1.weight"].double()[:, :, 0, 0]) + sd[f"{p}.pw1.bias"].double())
    gate = torch.sigmoid(linear(torch.relu(linear(y.mean((1, 2)), sd, f"{p}.se.fc.0")), sd, f"{p}.se.fc.2"))
    y = y * gate[:, None, None, :]
    y = torch.einsum("vhwc,oc->vhwo", y, sd[f"{p}.pw2.weight"].double()[:, :, 0, 0]) + sd[f"{p}.pw2.bias"].double()
    return h + y.permute(0, 3, 1, 2)


@pytest.mark.parametrize(("n", "num_queries", "grid", "out_tokens"), [(16, 4, (4, 4), 4), (16, 0, (4, 4), 16),
                                                                       (17, 0, (1, 17), 17)])
def test_c_abstractor(n, num_queries, grid, out_tokens):
    hd, expand, mid, k, depth = 4, 2, 3, 3, 1
    shapes = {"input_proj.weight": (hd, D), "input_proj.bias": (hd,), "final_norm.weight": (hd,),
              "final_norm.bias": (hd,), "readout.0.weight": (L, hd), "readout.0.bias": (L,),
              "readout.2.weight": (L, L), "readout.2.bias": (L,)}
    for stage in ("stage1", "stage2"):
        shapes |= _spatial_block_keys(f"{stage}.0", hd, expand, mid, k)
    module, sd = _build("c_abstractor", shapes, config={"num_queries": num_queries})
    assert (module.depth, module.hidden_dim) == (depth, hd)
    x = _tokens(n=n)
    h = linear(x, sd, "input_proj").transpose(1, 2).reshape(2, hd, *grid)
    h = _spatial_block_ref(h, sd, "stage1.0", k)
    if num_queries:
        h = F.adaptive_avg_pool2d(h, (2, 2))
    h = _spatial_block_ref(h, sd, "stage2.0", k).flatten(2).transpose(1, 2)
    h = layer_norm(h, sd["final_norm.weight"], sd["final_norm.bias"], 1e-5)
    ref = linear(silu(linear(h, sd, "readout.0")), sd, "readout.2")
    out = module(x)
    assert out.shape == (2, out_tokens, L)
    torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=0)
    expected_grid = None if n == 17 else ((2, 2) if num_queries else (4, 4))
    assert module.output_grid((4, 4), num_prefix_tokens=n - 16) == expected_grid


# ---------------------------------------------------------------- perceiver


def test_perceiver():
    heads, dim_head, q, depth, mult = 2, 3, 4, 2, 2
    inner = heads * dim_head
    shapes = {"perceiver.latents": (q, D), "perceiver.norm.weight": (D,), "perceiver.norm.bias": (D,),
              "proj.weight": (L, D), "proj.bias": (L,)}
    for i in range(depth):
        p = f"perceiver.layers.{i}"
        shapes |= {f"{p}.0.norm_media.weight": (D,), f"{p}.0.norm_media.bias": (D,),
                   f"{p}.0.norm_latents.weight": (D,), f"{p}.0.norm_latents.bias": (D,),
                   f"{p}.0.to_q.weight": (inner, D), f"{p}.0.to_kv.weight": (2 * inner, D),
                   f"{p}.0.to_out.weight": (D, inner), f"{p}.1.0.weight": (D,), f"{p}.1.0.bias": (D,),
                   f"{p}.1.1.weight": (mult * D, D), f"{p}.1.3.weight": (D, mult * D)}
    module, sd = _build("perceiver", shapes, config={"heads": heads})
    assert (module.num_queries, module.depth, module.dim_head, module.ff_mult, module.layout) == (q, depth, 3, 2,
                                                                                                 "queries")
    x = _tokens(n=17).double()
    lat = sd["perceiver.latents"].double().expand(2, q, D)
    for i in range(depth):
        p = f"perceiver.layers.{i}.0"
        xm = layer_norm(x, sd[f"{p}.norm_media.weight"], sd[f"{p}.norm_media.bias"], 1e-5)
        ln = layer_norm(lat, sd[f"{p}.norm_latents.weight"], sd[f"{p}.norm_latents.bias"], 1e-5)
        qq = linear(ln, sd, f"{p}.to_q")
        kv = linear(torch.cat([xm, ln], 1), sd, f"{p}.to_kv")
        kk, vv = kv[..., :inner], kv[..., inner:]
        outs = []
        for h in range(heads):  # explicit per-head attention
            sl = slice(h * dim_head, (h + 1) * dim_head)
            att = torch.softmax(qq[..., sl] @ kk[..., sl].transpose(1, 2) / math.sqrt(dim_head), dim=-1)
            outs.append(att @ vv[..., sl])
        lat = lat + linear(torch.cat(outs, -1), sd, f"{p}.to_out")
        f = f"perceiver.layers.{i}.1"
        lat = lat + linear(gelu(linear(layer_norm(lat, sd[f"{f}.0.weight"], sd[f"{f}.0.bias"], 1e-5), sd, f"{f}.1")),
                           sd, f"{f}.3")
    ref = linear(layer_norm(lat, sd["perceiver.norm.weight"], sd["perceiver.norm.bias"], 1e-5), sd, "proj")
    torch.testing.assert_close(module(x.float()).double(), ref, atol=ATOL, rtol=0)
    assert module.output_grid((4, 4)) is None


def test_perceiver_same_width_has_no_proj():
    shapes = {"perceiver.latents": (3, D), "perceiver.norm.weight": (D,), "perceiver.norm.bias": (D,)}
    p = "perceiver.layers.0.0"
    shapes |= {f"{p}.norm_media.weight": (D,), f"{p}.norm_media.bias": (D,), f"{p}.norm_latents.weight": (D,),
               f"{p}.norm_latents.bias": (D,), f"{p}.to_q.weight": (16, D), f"{p}.to_kv.weight": (32, D),
               f"{p}.to_out.weight": (D, 16)}  # ff_mult 0: no FFN weights
    module, _ = _build("perceiver", shapes, latent=D)
    assert (module.ff_mult, module.heads, module.dim_head) == (0, 8, 2)
    assert module(_tokens()).shape == (2, 3, D)


@pytest.mark.parametrize(("rtype", "config", "match"), [
    ("mlp", {"hidden_dim": 10 ** 9}, r"The mlp resampler's `hidden_dim` is 1000000000, outside 0\.\.65536\."),
    ("perceiver", {"depth": 10 ** 4}, r"`depth` is 10000, outside 0\.\.256\."),
    ("qformer", {"num_query_tokens": 600}, r"600 queries exceed BERT's 512 positions"),
])
def test_exception_config_caps(rtype, config, match):
    with pytest.raises(ValueError, match=match):
        build_panollava_resampler(rtype, vision_dim=D, latent_dim=L, config=config)
    with pytest.raises(TypeError, match="mapping of names to tensors"):
        build_panollava_resampler(rtype, vision_dim=D, latent_dim=L, state_dict={"proj.weight": [1.0]})
