"""Tests of panoviz_callback.attention: recomputed attention equals a hand computation, for any kernel."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel

from panoviz_callback import attention as att
from panoviz_callback.attention import (
    AttentionCapture, AttentionSite, capture_query_attention, encoder_attention_site, mha_attention,
    query_attention_sites, register_query_adapter,
)
from panoviz_callback.models import build_resampler

_ATOL = 1e-5


def _hand_softmax(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) per head, written out: (V, heads, Q, K)."""
    v, nq, e = q.shape
    d = e // heads
    out = torch.empty(v, heads, nq, k.shape[1], dtype=torch.float64)
    for h in range(heads):
        qh, kh = q[..., h * d:(h + 1) * d].double(), k[..., h * d:(h + 1) * d].double()
        logits = torch.einsum("vqd,vkd->vqk", qh, kh) / math.sqrt(d)
        out[:, h] = torch.exp(logits - logits.amax(-1, keepdim=True))
        out[:, h] /= out[:, h].sum(-1, keepdim=True)
    return out.float()


def _siglip(impl: str, head: bool = False) -> SiglipVisionModel:
    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=8, vision_use_head=head)
    cfg._attn_implementation = impl
    return SiglipVisionModel(cfg).eval()


# ---------------------------------------------------------------------------- encoder
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_encoder_capture_equals_hand_computation(impl):
    enc = _siglip(impl)
    x = torch.rand(3, 3, 32, 32)
    site, kind = encoder_attention_site(enc)
    assert kind == "mean" and site.name == "encoder.layers.1.self_attn"
    with torch.no_grad(), AttentionCapture([site]) as cap:
        out = enc(pixel_values=x, output_hidden_states=True)
    (weights,) = cap.weights()  # (V, heads, N, N)
    layer = enc.encoder.layers[1]
    hidden = layer.layer_norm1(out.hidden_states[1])  # the last block's attention input
    attn = layer.self_attn
    expected = _hand_softmax(F.linear(hidden, attn.q_proj.weight, attn.q_proj.bias),
                             F.linear(hidden, attn.k_proj.weight, attn.k_proj.bias), 4)
    torch.testing.assert_close(weights, expected, atol=_ATOL, rtol=0)
    if impl == "eager":  # and the model's own eager weights
        with torch.no_grad():
            eager = enc(pixel_values=x, output_attentions=True).attentions[-1]
        torch.testing.assert_close(weights, eager, atol=_ATOL, rtol=0)


def test_capture_is_the_same_for_sdpa_and_eager():
    x = torch.rand(2, 3, 32, 32)
    found = []
    for impl in ("sdpa", "eager"):
        enc = _siglip(impl)
        site, _ = encoder_attention_site(enc)
        with torch.no_grad(), AttentionCapture([site]) as cap:
            enc(pixel_values=x)
        found.append(cap.weights()[0])
    torch.testing.assert_close(found[0], found[1], atol=_ATOL, rtol=0)


def test_encoder_kinds():
    site, kind = encoder_attention_site(_siglip("sdpa", head=True))
    assert kind == "probe" and site.name == "head.attention"
    dino = Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                                    patch_size=8, image_size=32))
    site, kind = encoder_attention_site(dino)
    assert kind == "cls" and site.name.endswith("layer.1.attention")
    reason = encoder_attention_site(lambda x: x)
    assert isinstance(reason, str) and "not an nn.Module" in reason
    assert "no attention module" in encoder_attention_site(nn.Linear(3, 3))


def test_probe_attention_equals_multihead_attention_weights():
    enc = _siglip("sdpa", head=True)
    site, _ = encoder_attention_site(enc)
    with torch.no_grad(), AttentionCapture([site]) as cap:
        out = enc(pixel_values=torch.rand(2, 3, 32, 32))
    head = enc.head
    with torch.no_grad():
        probe = head.probe.repeat(2, 1, 1)
        _, ref = head.attention(probe, out.last_hidden_state, out.last_hidden_state, need_weights=True,
                                average_attn_weights=False)
    torch.testing.assert_close(cap.weights()[0], ref, atol=_ATOL, rtol=0)


# ---------------------------------------------------------------------------- resamplers
def _qformer_by_hand(r: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The cross-attention of a depth-1 QFormerResampler, computed step by step."""
    layer = r.layers[0]
    q = r.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
    h0 = layer["self_attn"].norm(q)
    sa = layer["self_attn"].attn
    q = q + F.multi_head_attention_forward(
        h0.transpose(0, 1), h0.transpose(0, 1), h0.transpose(0, 1), sa.embed_dim, sa.num_heads, sa.in_proj_weight,
        sa.in_proj_bias, None, None, False, 0.0, sa.out_proj.weight, sa.out_proj.bias, need_weights=False)[0].transpose(0, 1)
    ca = layer["cross_attn"]
    h = ca.norm_q(q)
    kv = ca.to_kv(ca.norm_kv(tokens))
    w_q, w_k, _ = ca.attn.in_proj_weight.chunk(3)
    b_q, b_k, _ = ca.attn.in_proj_bias.chunk(3)
    return _hand_softmax(F.linear(h, w_q, b_q), F.linear(kv, w_k, b_k), ca.attn.num_heads)


def test_qformer_capture_equals_hand_computation():
    torch.manual_seed(0)
    r = build_resampler("qformer", 12, 16, num_queries=5, depth=1, heads=2).eval()
    tokens = torch.randn(3, 9, 12)
    with torch.no_grad():
        expected = _qformer_by_hand(r, tokens).mean(1)  # heads averaged
        got = capture_query_attention(r, tokens)
    torch.testing.assert_close(got, expected, atol=_ATOL, rtol=0)
    assert torch.allclose(got.sum(-1), torch.ones(3, 5))


@pytest.mark.parametrize("kind", ["qformer", "perceiver"])
def test_capture_equals_multihead_attention_need_weights(kind):
    torch.manual_seed(1)
    r = build_resampler(kind, 12, 16, num_queries=4, depth=2, heads=4).eval()
    tokens = torch.randn(2, 9, 12)
    mha = r.layers[-1]["cross_attn"].attn
    seen = {}
    handle = mha.register_forward_pre_hook(lambda m, args: seen.update(q=args[0], k=args[1]))
    with torch.no_grad():
        reference = r(tokens)
    handle.remove()
    with torch.no_grad():
        _, ref = mha(seen["q"], seen["k"], seen["k"], need_weights=True, average_attn_weights=True)
        got = capture_query_attention(r, tokens)
        assert torch.equal(r(tokens), reference)  # the model is unchanged
    ref = ref[..., :9] / ref[..., :9].sum(-1, keepdim=True)  # perceiver: latents appended to the keys
    torch.testing.assert_close(got, ref, atol=_ATOL, rtol=0)
    assert not mha._forward_pre_hooks and not mha._forward_pre_hooks_with_kwargs


class _BertQFormer(nn.Module):
    """A BLIP-2 style Q-Former on transformers' BertModel (cross-attention every layer)."""

    output_layout = "queries"

    def __init__(self, impl: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        cfg = BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                         is_decoder=True, add_cross_attention=True, vocab_size=10)
        cfg._attn_implementation = impl
        self.bert = BertModel(cfg, add_pooling_layer=False).eval()
        self.queries = nn.Parameter(torch.randn(1, 3, 16))

    def forward(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.bert(inputs_embeds=self.queries.expand(tokens.shape[0], -1, -1), encoder_hidden_states=tokens,
                         **kwargs)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bert_qformer_capture_equals_eager_cross_attentions(impl):
    tokens = torch.randn(2, 7, 16)
    r = _BertQFormer(impl)
    sites = query_attention_sites(r)
    assert [s.name for s in sites][:2] == ["bert.encoder.layer.0.attention.self", "bert.encoder.layer.0.crossattention.self"]
    with torch.no_grad(), AttentionCapture(sites) as cap:
        r(tokens)
    weights = cap.weights()
    assert len(weights) == 2  # the self-attention calls are recognised and left out
    with torch.no_grad():
        eager = _BertQFormer("eager")(tokens, output_attentions=True).cross_attentions
    for got, ref in zip(weights, eager, strict=True):
        torch.testing.assert_close(got, ref, atol=_ATOL, rtol=0)
    torch.testing.assert_close(capture_query_attention(r, tokens, layer=0), eager[0].mean(1), atol=_ATOL, rtol=0)


def test_layer_selection_and_errors():
    r = build_resampler("qformer", 8, 8, num_queries=2, depth=3, heads=1).eval()
    tokens = torch.randn(2, 4, 8)
    with AttentionCapture(query_attention_sites(r)) as cap, torch.no_grad():
        r(tokens)
    weights = cap.weights()
    assert len(weights) == 3
    torch.testing.assert_close(capture_query_attention(r, tokens, layer=0), weights[0].mean(1))
    with pytest.raises(ValueError, match=r"Argument `attention_layer` must be in \[-3, 2\]"):
        capture_query_attention(r, tokens, layer=3)
    with pytest.raises(ValueError, match="No attention adapter knows Linear"):
        capture_query_attention(nn.Linear(8, 8), tokens)


def test_register_query_adapter_for_another_family():
    class ToQK(nn.Module):  # a Perceiver-like family the built-in adapters do not know
        def __init__(self) -> None:
            super().__init__()
            self.to_q, self.to_k = nn.Linear(4, 4), nn.Linear(4, 4)
            self.latents = nn.Parameter(torch.randn(2, 4))

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            q = self.to_q(self.latents).expand(tokens.shape[0], -1, -1)
            return torch.softmax(q @ self.to_k(tokens).mT / 2.0, -1) @ tokens

    def compute(module, args, kwargs):
        q = module.to_q(module.latents).expand(args[0].shape[0], -1, -1)
        return torch.softmax(q @ module.to_k(args[0]).mT / 2.0, -1).unsqueeze(1)  # (V, 1, Q, N)

    def adapter(resampler):
        return [AttentionSite(resampler, compute, "self")] if isinstance(resampler, ToQK) else []

    r = ToQK()
    assert query_attention_sites(r) == []
    register_query_adapter(adapter)
    try:
        tokens = torch.randn(3, 5, 4)
        with torch.no_grad():
            got = capture_query_attention(r, tokens)
            expected = torch.softmax(r.to_q(r.latents) @ r.to_k(tokens).mT / 2.0, -1)
        torch.testing.assert_close(got, expected)
    finally:
        att._QUERY_ADAPTERS.remove(adapter)
    with pytest.raises(TypeError, match="Expected `adapter` to be callable"):
        register_query_adapter(3)


def test_mha_self_attention_call_is_not_cross_attention():
    mha = nn.MultiheadAttention(4, 1, batch_first=True)
    x = torch.randn(1, 3, 4)
    assert mha_attention(mha, (x, x, x), {}) is None
    assert mha_attention(mha, (x, x.clone(), x), {}).shape == (1, 1, 3, 3)


def test_panollava_perceiver_capture_equals_hand_computation():
    from panoviz_callback.panollava.resamplers import build_panollava_resampler

    torch.manual_seed(0)
    r = build_panollava_resampler("perceiver", vision_dim=16, latent_dim=16, config={"resampler_config": {
        "num_latents": 3, "depth": 2, "heads": 2, "dim_head": 8}}).eval()
    tokens = torch.randn(2, 6, 16)
    attn = r.perceiver.layers[-1][0]
    seen = {}
    handle = attn.register_forward_pre_hook(lambda m, args: seen.update(tokens=args[0], latents=args[1]))
    with torch.no_grad():
        r(tokens)
        handle.remove()
        media, lat = attn.norm_media(seen["tokens"]), attn.norm_latents(seen["latents"])
        k = attn.to_kv(torch.cat([media, lat], 1)).chunk(2, -1)[0]
        expected = _hand_softmax(attn.to_q(lat), k, 2).mean(1)[..., :6]
        got = capture_query_attention(r, tokens)
    torch.testing.assert_close(got, expected / expected.sum(-1, keepdim=True), atol=_ATOL, rtol=0)
