"""Attention maps recomputed from a model's own projections: resampler queries and encoder CLS/probe.

Nothing here asks the model for its attention weights (SDPA and flash kernels never form
them). Instead, forward pre-hooks record the *inputs* of the attention modules during the
one forward the analysis runs anyway, and the weights are recomputed afterwards from the
same module's query/key projections:

.. math::

    A = \\mathrm{softmax}\\big(Q K^\\top \\cdot s\\big), \\quad Q = x_q W_q^\\top + b_q,\\;
    K = x_k W_k^\\top + b_k, \\quad s = d_{head}^{-1/2}\\text{ (or the module's own scale)}

per head, so the result is the same whatever attention kernel the model uses. The hooks are
removed when the capture ends: the model is left exactly as it was. Attention masks are not
applied (the analysis passes none).

Query-token resamplers are found by *adapters*: functions ``adapter(resampler) -> list of
AttentionSite`` tried in order (:func:`register_query_adapter` adds one). Built in:

- this package's :class:`~panoviz_callback.models.resamplers.QFormerResampler` /
  ``PerceiverResampler`` (the ``nn.MultiheadAttention`` of each layer's ``cross_attn``);
- transformers BERT-style cross-attention (modules with ``query`` / ``key`` Linears called
  with ``encoder_hidden_states``, e.g. a BLIP-2 / PanoLLaVA Q-Former built on ``BertModel``);
- Flamingo-style latent attention ``forward(tokens, latents)`` with ``norm_media``,
  ``norm_latents``, ``to_q``, ``to_kv``, ``heads``, ``scale`` (PanoLLaVA's Perceiver);
- any other ``nn.MultiheadAttention`` called with a key that is not its query.

Keys are assumed to start with the tokens the resampler reads (the view's ``N`` patch tokens,
after the prefix tokens for a resampler with ``input_tokens = "all"``); a Perceiver's latents
appended after them are dropped and the maps are renormalised over the ``N`` patch tokens.

Encoder attention (:func:`encoder_attention_site`): SigLIP's attention-pooling (MAP) head
probe when the model has one (``"probe"``), else the CLS token's attention in the last block
(``"cls"``), else the mean attention each patch receives in the last block (``"mean"``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AttentionSite", "AttentionCapture", "register_query_adapter", "query_attention_sites",
    "encoder_attention_site", "capture_query_attention", "mha_attention", "qk_attention",
]

#: ``compute(module, args, kwargs) -> (V, heads, Q, K)`` probabilities, or None when this call
#: was no cross-attention (e.g. a BERT layer's self-attention).
AttentionFn = Callable[[nn.Module, tuple, dict], "Tensor | None"]


@dataclass(frozen=True)
class AttentionSite:
    """One attention module to watch and how to recompute its weights from its recorded inputs.

    Attributes:
        module: the module whose inputs are recorded (a forward pre-hook).
        compute: ``compute(module, args, kwargs) -> (V, heads, Q, K)`` or None.
        name: a label (the module's attribute path).
    """

    module: nn.Module
    compute: AttentionFn
    name: str


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def _softmax_qk(q: Tensor, k: Tensor, heads: int, scale: float) -> Tensor:
    """``q (V, Q, heads*d)``, ``k (V, K, heads*d)`` -> ``(V, heads, Q, K)`` softmax probabilities."""
    v, nq, nk = q.shape[0], q.shape[1], k.shape[1]
    q = q.reshape(v, nq, heads, -1).transpose(1, 2)  # (V, heads, Q, d)
    k = k.reshape(v, nk, heads, -1).transpose(1, 2)  # (V, heads, K, d)
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)  # (V, heads, Q, K)


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def mha_attention(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> Tensor | None:
    """Recompute an ``nn.MultiheadAttention``'s weights from its recorded ``(query, key, ...)`` inputs.

    Returns:
        ``(V, heads, Q, K)`` (``K`` includes ``bias_k`` when the module has one), or None when
        the call was a self-attention (the key is the query).
    """
    query, key = _arg(args, kwargs, 0, "query"), _arg(args, kwargs, 1, "key")
    if not isinstance(query, Tensor) or not isinstance(key, Tensor) or key is query:
        return None
    if not module.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)  # (V, Q, D), (V, K, D)
    if module._qkv_same_embed_dim:
        w_q, w_k, _ = module.in_proj_weight.float().chunk(3)
    else:
        w_q, w_k = module.q_proj_weight.float(), module.k_proj_weight.float()
    b_q = b_k = None
    if module.in_proj_bias is not None:
        b_q, b_k, _ = module.in_proj_bias.float().chunk(3)
    q = F.linear(query.float(), w_q, b_q)  # (V, Q, E)
    k = F.linear(key.float(), w_k, b_k)  # (V, K, E)
    if module.bias_k is not None:
        k = torch.cat([k, module.bias_k.float().reshape(1, 1, -1).expand(k.shape[0], 1, -1)], dim=1)
    return _softmax_qk(q, k, module.num_heads, module.head_dim ** -0.5)


def qk_attention(module: nn.Module, args: tuple, kwargs: dict) -> Tensor | None:
    """Recompute the self-attention of a transformers attention module (``q_proj`` / ``k_proj``).

    Works for SigLIP, SigLIP2, CLIP and DINOv2 attention (and timm-style fused ``qkv`` with
    ``num_heads``). Returns ``(V, heads, N, N)``.
    """
    hidden = _arg(args, kwargs, 0, "hidden_states")
    if not isinstance(hidden, Tensor):
        hidden = _arg(args, kwargs, 0, "x")
    if not isinstance(hidden, Tensor):
        return None
    if hasattr(module, "qkv"):  # timm: qkv Linear(D, 3 D), heads = num_heads
        q, k, _ = _linear(module.qkv, hidden).chunk(3, dim=-1)
        heads = int(module.num_heads)
    else:
        q, k = _linear(module.q_proj, hidden), _linear(module.k_proj, hidden)
        head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
        heads = int(getattr(module, "num_heads", 0) or q.shape[-1] // int(head_dim))
    head_dim = q.shape[-1] // heads
    scale = getattr(module, "scale", None) or getattr(module, "scaling", None) or head_dim ** -0.5
    return _softmax_qk(q, k, heads, float(scale))


def _bert_cross_attention(module: nn.Module, args: tuple, kwargs: dict) -> Tensor | None:
    hidden = _arg(args, kwargs, 0, "hidden_states")
    context = _arg(args, kwargs, 1, "encoder_hidden_states")
    if not isinstance(hidden, Tensor) or not isinstance(context, Tensor):
        return None  # a self-attention call
    q, k = _linear(module.query, hidden), _linear(module.key, context)
    head_dim = int(module.attention_head_size)
    scale = getattr(module, "scaling", None) or head_dim ** -0.5
    return _softmax_qk(q, k, q.shape[-1] // head_dim, float(scale))


def _latent_attention(module: nn.Module, args: tuple, kwargs: dict) -> Tensor | None:
    """Flamingo-style ``forward(tokens, latents)``: keys = ``to_kv([norm_media(tokens); norm_latents(latents)])``."""
    tokens, latents = _arg(args, kwargs, 0, "tokens"), _arg(args, kwargs, 1, "latents")
    if not isinstance(tokens, Tensor) or not isinstance(latents, Tensor):
        return None
    media, lat = module.norm_media(tokens.float()), module.norm_latents(latents.float())
    q = _linear(module.to_q, lat)
    k, _ = _linear(module.to_kv, torch.cat([media, lat], dim=1)).chunk(2, dim=-1)
    return _softmax_qk(q, k, int(module.heads), float(module.scale))


# ----------------------------------------------------------------------------- query adapters
Adapter = Callable[[nn.Module], "list[AttentionSite]"]
_QUERY_ADAPTERS: list[Adapter] = []


def register_query_adapter(adapter: Adapter, *, first: bool = True) -> Adapter:
    """Add a resampler family: ``adapter(resampler)`` returns its cross-attention sites (or ``[]``).

    Adapters are tried in order (a new one first by default); the first non-empty answer wins.
    Usable as a decorator. Example, for a Perceiver whose layers hold ``to_q`` / ``to_k``::

        >>> @register_query_adapter  # doctest: +SKIP
        ... def my_perceiver(resampler):
        ...     def compute(attn, args, kwargs):  # args = (tokens, latents) of attn.forward
        ...         q, k = attn.to_q(args[1]), attn.to_k(args[0])
        ...         return torch.softmax(split_heads(q) @ split_heads(k).mT * attn.scale, -1)
        ...     return [AttentionSite(layer.attn, compute, f"layers.{i}.attn")
        ...             for i, layer in enumerate(getattr(resampler, "my_layers", []))]
    """
    if not callable(adapter):
        raise TypeError(f"Expected `adapter` to be callable, got {type(adapter).__name__}.")
    if adapter in _QUERY_ADAPTERS:
        _QUERY_ADAPTERS.remove(adapter)
    _QUERY_ADAPTERS.insert(0 if first else len(_QUERY_ADAPTERS), adapter)
    return adapter


def _ours(resampler: nn.Module) -> list[AttentionSite]:
    ours = sys.modules.get("panoviz_callback.models.resamplers")  # not imported: cannot be ours (no lightning import)
    if ours is None or not isinstance(resampler, ours._QueryResampler):
        return []
    return [AttentionSite(layer["cross_attn"].attn, mha_attention, f"layers.{i}.cross_attn.attn")
            for i, layer in enumerate(resampler.layers)]


def _bert(resampler: nn.Module) -> list[AttentionSite]:
    return [AttentionSite(m, _bert_cross_attention, name) for name, m in resampler.named_modules()
            if isinstance(getattr(m, "query", None), nn.Linear) and isinstance(getattr(m, "key", None), nn.Linear)
            and hasattr(m, "attention_head_size")]


def _latents(resampler: nn.Module) -> list[AttentionSite]:
    return [AttentionSite(m, _latent_attention, name) for name, m in resampler.named_modules()
            if all(isinstance(getattr(m, a, None), nn.Module) for a in ("to_q", "to_kv", "norm_media", "norm_latents"))
            and hasattr(m, "heads") and hasattr(m, "scale")]


def _any_mha(resampler: nn.Module) -> list[AttentionSite]:
    return [AttentionSite(m, mha_attention, name) for name, m in resampler.named_modules()
            if isinstance(m, nn.MultiheadAttention)]


_QUERY_ADAPTERS.extend([_ours, _bert, _latents, _any_mha])


def query_attention_sites(resampler: Any) -> list[AttentionSite]:
    """The cross-attention sites of ``resampler`` from the first adapter that knows it (``[]``: none)."""
    module = getattr(resampler, "_orig_mod", resampler)
    if not isinstance(module, nn.Module):
        return []
    for adapter in _QUERY_ADAPTERS:
        sites = adapter(module)
        if sites:
            return list(sites)
    return []


# ----------------------------------------------------------------------------- encoder sites
EncoderKind = Literal["probe", "cls", "mean"]


def encoder_attention_site(encoder: Any) -> tuple[AttentionSite, EncoderKind] | str:
    """The attention to draw for ``encoder``: ``(site, kind)``, or the reason there is none.

    ``kind``: ``"probe"`` (SigLIP's MAP head, attention of its probe over the tokens), ``"cls"``
    (the CLS token's attention in the last block) or ``"mean"`` (attention received, averaged
    over the last block's queries).
    """
    from panoviz_callback.features import _num_prefix, _resolve

    enc = _resolve(encoder)
    base = getattr(enc.base, "_orig_mod", enc.base)
    if not isinstance(base, nn.Module):
        return "the encoder is not an nn.Module (no attention layer to watch)"
    head = getattr(base, "head", None)
    if isinstance(getattr(head, "attention", None), nn.MultiheadAttention) and hasattr(head, "probe"):
        return AttentionSite(head.attention, mha_attention, "head.attention"), "probe"
    blocks = [(name, m) for name, m in base.named_modules()
              if (isinstance(getattr(m, "q_proj", None), nn.Linear) and isinstance(getattr(m, "k_proj", None),
                                                                                   nn.Linear))
              or (isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int))]
    if not blocks:
        return (f"{type(base).__name__} has no attention module with q_proj/k_proj (or qkv) projections and no "
                "attention-pooling head")
    name, module = blocks[-1]
    try:
        prefix = _num_prefix(enc)
    except ValueError:
        prefix = 0
    return AttentionSite(module, qk_attention, name), "cls" if prefix > 0 else "mean"


# ----------------------------------------------------------------------------- capture
class AttentionCapture:
    """Record the inputs of attention sites during a forward (context manager); recompute afterwards.

    The hooks live only inside the ``with`` block and only record (detached) inputs: outputs,
    gradients and the model are not touched.

    Args:
        sites: the :class:`AttentionSite` list to watch.

    Example:
        >>> from panoviz_callback.models import build_resampler
        >>> r = build_resampler("qformer", 8, 8, num_queries=3, heads=2).eval()
        >>> with AttentionCapture(query_attention_sites(r)) as cap:
        ...     _ = r(torch.rand(2, 5, 8))
        >>> [tuple(w.shape) for w in cap.weights()]
        [(2, 2, 3, 5), (2, 2, 3, 5)]
    """

    def __init__(self, sites: list[AttentionSite]) -> None:
        self.sites = list(sites)
        self._calls: list[tuple[AttentionSite, tuple, dict]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> AttentionCapture:
        self._calls = []
        for site in self.sites:
            self._handles.append(site.module.register_forward_pre_hook(self._recorder(site), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _recorder(self, site: AttentionSite) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            detach = lambda x: x.detach() if isinstance(x, Tensor) else x  # noqa: E731
            self._calls.append((site, tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()}))
        return record

    def weights(self) -> list[Tensor]:
        """``(V, heads, Q, K)`` float32 per recorded cross-attention call, in call order."""
        return [w for _, w in self.named_weights()]

    def named_weights(self) -> list[tuple[str, Tensor]]:
        """``[(site name, (V, heads, Q, K) float32)]`` per recorded cross-attention call, in call order."""
        out = []
        with torch.no_grad():
            for site, args, kwargs in self._calls:
                w = site.compute(site.module, args, kwargs)
                if w is not None:
                    out.append((site.name, w.float()))
        return out


def _select(weights: list[Tensor], layer: int, n_tokens: int, offset: int = 0) -> Tensor:
    """Head-averaged ``(V, Q, N)`` of cross-attention call ``layer``, renormalised over keys ``offset:offset+N``
    (``offset``: prefix tokens a resampler with ``input_tokens = "all"`` reads before the patches)."""
    if not weights:
        raise ValueError("no cross-attention call was recorded")
    if not -len(weights) <= layer < len(weights):
        raise ValueError(f"Argument `attention_layer` must be in [{-len(weights)}, {len(weights) - 1}] for "
                         f"{len(weights)} cross-attention layers, got {layer}.")
    w = weights[layer]
    if w.shape[-1] < offset + n_tokens:
        raise ValueError(f"Expected the cross-attention keys to hold the {n_tokens} patch tokens, got {w.shape[-1]} "
                         "keys.")
    attn = w.mean(dim=1)[..., offset:offset + n_tokens]  # (V, Q, N): heads averaged, prefix and latents dropped
    return attn / attn.sum(-1, keepdim=True).clamp_min(1e-12)


def capture_query_attention(resampler: nn.Module, tokens: Tensor, *, layer: int = -1) -> Tensor:
    """Cross-attention of a query resampler's queries over ``tokens``, from one resampler forward.

    Args:
        resampler: a query-token resampler an adapter knows (see :func:`register_query_adapter`).
        tokens: ``(V, N, D)`` the patch tokens it reads.
        layer: which cross-attention layer (``-1``: the last).

    Returns:
        ``(V, Q, N)`` float32, averaged over heads; each row sums to 1.

    Raises:
        ValueError: no adapter knows ``resampler``, or ``layer`` is out of range.
    """
    sites = query_attention_sites(resampler)
    if not sites:
        raise ValueError(f"No attention adapter knows {type(resampler).__name__}; register one with "
                         "`register_query_adapter`.")
    with torch.no_grad(), AttentionCapture(sites) as cap:
        resampler(tokens)
    return _select(cap.weights(), layer, tokens.shape[1])
