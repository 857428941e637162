"""PanoLLaVA's BERT Q-Former: its key layout loads strictly; the forward equals BERT written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from _panollava_refs import gelu, layer_norm, linear, random_weights

from panoviz_callback.panollava.resamplers import build_panollava_resampler

OUT = 6


def _bert_keys(d: int, layers: int, q: int) -> dict[str, tuple[int, ...]]:
    keys: dict[str, tuple[int, ...]] = {
        "query": (1, q, d), "proj.weight": (OUT, d), "proj.bias": (OUT,),
        "bert.embeddings.word_embeddings.weight": (30522, d), "bert.embeddings.position_embeddings.weight": (512, d),
        "bert.embeddings.token_type_embeddings.weight": (2, d), "bert.embeddings.LayerNorm.weight": (d,),
        "bert.embeddings.LayerNorm.bias": (d,), "bert.pooler.dense.weight": (d, d), "bert.pooler.dense.bias": (d,),
    }
    for i in range(layers):
        p = f"bert.encoder.layer.{i}"
        for att in ("attention", "crossattention"):
            for lin in ("self.query", "self.key", "self.value", "output.dense"):
                keys[f"{p}.{att}.{lin}.weight"], keys[f"{p}.{att}.{lin}.bias"] = (d, d), (d,)
            keys[f"{p}.{att}.output.LayerNorm.weight"], keys[f"{p}.{att}.output.LayerNorm.bias"] = (d,), (d,)
        keys[f"{p}.intermediate.dense.weight"], keys[f"{p}.intermediate.dense.bias"] = (4 * d, d), (4 * d,)
        keys[f"{p}.output.dense.weight"], keys[f"{p}.output.dense.bias"] = (d, 4 * d), (d,)
        keys[f"{p}.output.LayerNorm.weight"], keys[f"{p}.output.LayerNorm.bias"] = (d,), (d,)
    return keys


def _attention(hidden, context, sd, p, heads, causal):
    d = hidden.shape[-1]
    hd = d // heads
    q, k, v = (linear(src, sd, f"{p}.self.{n}") for src, n in ((hidden, "query"), (context, "key"), (context, "value")))
    outs = []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd)  # (V, Q, K)
        if causal:
            future = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        outs.append(torch.softmax(scores, -1) @ v[..., sl])
    out = linear(torch.cat(outs, -1), sd, f"{p}.output.dense")
    return layer_norm(out + hidden, sd[f"{p}.output.LayerNorm.weight"], sd[f"{p}.output.LayerNorm.bias"], 1e-12)


def _qformer_ref(x, sd, layers, heads):
    q = sd["query"].shape[1]
    e = "bert.embeddings"
    h = sd["query"].double() + sd[f"{e}.position_embeddings.weight"][:q].double() \
        + sd[f"{e}.token_type_embeddings.weight"][0].double()
    h = layer_norm(h.expand(x.shape[0], -1, -1), sd[f"{e}.LayerNorm.weight"], sd[f"{e}.LayerNorm.bias"], 1e-12)
    x = x.double()
    for i in range(layers):
        p = f"bert.encoder.layer.{i}"
        h = _attention(h, h, sd, f"{p}.attention", heads, causal=True)  # is_decoder: causal self-attention
        h = _attention(h, x, sd, f"{p}.crossattention", heads, causal=False)
        f = linear(gelu(linear(h, sd, f"{p}.intermediate.dense")), sd, f"{p}.output.dense")
        h = layer_norm(f + h, sd[f"{p}.output.LayerNorm.weight"], sd[f"{p}.output.LayerNorm.bias"], 1e-12)
    return linear(h, sd, "proj")


@pytest.mark.parametrize(("revision", "d", "heads", "config"), [
    ("head", 8, 2, {"resampler_config": {"num_attention_heads": 2}}),
    ("dc64bc5", 16, 8, None),  # heads fixed at 8 there
])
def test_qformer_equals_bert_by_hand(revision, d, heads, config):
    layers, q = 2, 3
    sd = random_weights(_bert_keys(d, layers, q))
    module = build_panollava_resampler("qformer", vision_dim=d, latent_dim=OUT, revision=revision, config=config,
                                       state_dict=sd)
    module.load_state_dict(sd, strict=True)
    assert (module.num_queries, module.num_hidden_layers, module.num_attention_heads) == (q, layers, heads)
    assert module.layout == "queries" and module.output_grid((4, 4), 1) is None
    x = torch.randn(2, 17, d, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = module(x)
    assert out.shape == (2, q, OUT)
    torch.testing.assert_close(out.double(), _qformer_ref(x, sd, layers, heads), atol=2e-5, rtol=0)


def test_qformer_queries_are_causal():
    d = 8
    sd = random_weights(_bert_keys(d, 1, 3))
    module = build_panollava_resampler("qformer", vision_dim=d, latent_dim=OUT, state_dict=sd,
                                       config={"num_attention_heads": 2})
    module.load_state_dict(sd, strict=True)
    x = torch.randn(1, 5, d)
    with torch.no_grad():
        before = module(x)
        module.query[0, 2] += torch.linspace(-1, 1, d)  # not a constant: LayerNorm would remove it
        after = module(x)
    torch.testing.assert_close(after[:, :2], before[:, :2])  # earlier queries do not see the last one
    assert not torch.allclose(after[:, 2], before[:, 2])


def test_qformer_legacy_buffers_load():
    sd = random_weights(_bert_keys(8, 1, 2))
    sd["bert.embeddings.position_ids"] = torch.arange(512)[None]  # saved by transformers < 4.31
    module = build_panollava_resampler("qformer", vision_dim=8, latent_dim=OUT, state_dict=sd,
                                       config={"num_attention_heads": 2})
    module.load_state_dict(sd, strict=True)
    with pytest.raises(ValueError, match=r"width 8 to be divisible by its 3 attention heads"):
        build_panollava_resampler("qformer", vision_dim=8, latent_dim=OUT, config={"num_attention_heads": 3})
