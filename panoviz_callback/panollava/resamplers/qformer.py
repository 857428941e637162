"""PanoLLaVA's ``qformer`` resampler: learned queries through transformers' BERT with cross-attention."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from panoviz_callback.encoders import _quiet_transformers
from panoviz_callback.panollava.resamplers._base import PanoResampler

__all__ = ["QFormerResampler"]

# Buffers that transformers < 4.31 saved with BERT's weights; today they are not persistent.
_LEGACY_BUFFERS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")


class QFormerResampler(PanoResampler):
    """PanoLLaVA's ``qformer``: ``query`` ``(1, Q, D)`` -> ``BertModel`` (``bert.*``) cross-attending the tokens -> ``proj``.

    The BERT is built as PanoLLaVA builds it: ``BertConfig(hidden_size=in_dim,
    num_hidden_layers, num_attention_heads, intermediate_size=4 * in_dim)`` with
    ``is_decoder=True`` and ``add_cross_attention=True`` (all other BERT defaults: GELU, LayerNorm
    eps 1e-12, 30522-word embeddings, 512 positions, a pooler). The queries enter as
    ``inputs_embeds``, so BERT adds its position and token-type-0 embeddings and a LayerNorm;
    and since ``is_decoder`` is set, the queries' self-attention is **causal** (query ``i`` sees
    queries ``0..i`` only). Every token (prefix included) is a key/value of the cross-attention.

    Args:
        in_dim: encoder feature size (BERT's width).
        out_dim: output size.
        num_queries: learned queries ``Q`` (at most 512).
        num_hidden_layers: BERT layers.
        num_attention_heads: heads (PanoLLaVA ``dc64bc5`` always uses 8).

    Shape:
        ``(V, N, in_dim) -> (V, Q, out_dim)``.
    """

    layout = "queries"

    def __init__(
        self, in_dim: int, out_dim: int, *, num_queries: int = 64, num_hidden_layers: int = 6,
        num_attention_heads: int = 8,
    ) -> None:
        super().__init__(in_dim, out_dim)
        from transformers import BertConfig, BertModel

        if in_dim % num_attention_heads:
            raise ValueError(f"Expected the qformer width {in_dim} to be divisible by its "
                             f"{num_attention_heads} attention heads.")
        self.num_queries, self.num_hidden_layers = int(num_queries), int(num_hidden_layers)
        self.num_attention_heads = int(num_attention_heads)
        cfg = BertConfig(hidden_size=in_dim, num_hidden_layers=self.num_hidden_layers,
                         num_attention_heads=self.num_attention_heads, intermediate_size=4 * in_dim)
        cfg.is_decoder = True
        cfg.add_cross_attention = True
        with _quiet_transformers():
            self.bert = BertModel(cfg)
        self.query = nn.Parameter(torch.zeros(1, self.num_queries, in_dim))
        self.proj = nn.Linear(in_dim, out_dim)
        self._register_load_state_dict_pre_hook(_drop_legacy_buffers)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(V, N, in_dim)`` to ``(V, Q, out_dim)``."""
        queries = self.query.expand(x.shape[0], -1, -1)  # (V, Q, D)
        mask = torch.ones(x.shape[:-1], device=x.device, dtype=x.dtype)  # (V, N)
        out = self.bert(inputs_embeds=queries, encoder_hidden_states=x, encoder_attention_mask=mask)
        return self.proj(out.last_hidden_state)


def _drop_legacy_buffers(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    for key in _LEGACY_BUFFERS:
        state_dict.pop(prefix + key, None)
