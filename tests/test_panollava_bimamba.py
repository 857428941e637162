"""PanoLLaVA's BiMamba resampler in pure torch: key layout, the S6 equations written out, mamba_ssm parity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _panollava_refs import layer_norm, linear, random_weights, silu

from panoviz_callback.panollava.resamplers import (
    BiMambaResampler,
    MambaMixer,
    MLPResampler,
    build_panollava_resampler,
    selective_scan,
)

D, H, OUT = 8, 12, 6  # encoder width, block width, latent width
E, S, K, R = 20, 4, 3, 1  # d_inner, d_state, d_conv, dt_rank (ceil(12 / 16))


def _mixer_keys(p: str) -> dict[str, tuple[int, ...]]:
    return {f"{p}.in_proj.weight": (2 * E, H), f"{p}.conv1d.weight": (E, 1, K), f"{p}.conv1d.bias": (E,),
            f"{p}.x_proj.weight": (R + 2 * S, E), f"{p}.dt_proj.weight": (E, R), f"{p}.dt_proj.bias": (E,),
            f"{p}.A_log": (E, S), f"{p}.D": (E,), f"{p}.out_proj.weight": (H, E)}


def _bimamba_keys(layers: int) -> dict[str, tuple[int, ...]]:
    keys = {"input_proj.weight": (H, D), "input_proj.bias": (H,), "final_norm.weight": (H,), "final_norm.bias": (H,),
            "output_proj.weight": (OUT, H), "output_proj.bias": (OUT,)}
    for i in range(layers):
        keys |= {f"blocks.{i}.norm.weight": (H,), f"blocks.{i}.norm.bias": (H,)}
        keys |= _mixer_keys(f"blocks.{i}.forward_block") | _mixer_keys(f"blocks.{i}.backward_block")
    return keys


def _mixer_ref(u, sd, p):
    """One Mamba mixer in float64, the scan in closed form: h_t = sum_s exp(A sum_{s<r<=t} delta_r) delta_s B_s x_s."""
    length = u.shape[1]
    xz = linear(u, sd, f"{p}.in_proj")
    x, z = xz[..., :E], xz[..., E:]
    w, b = sd[f"{p}.conv1d.weight"].double()[:, 0], sd[f"{p}.conv1d.bias"].double()
    conv = torch.stack([b + sum(w[:, j] * x[:, t - (K - 1) + j] for j in range(K) if t - (K - 1) + j >= 0)
                        for t in range(length)], dim=1)  # causal depthwise convolution, tap by tap
    x = silu(conv)
    dbl = linear(x, sd, f"{p}.x_proj")
    dt, bb, cc = dbl[..., :R], dbl[..., R:R + S], dbl[..., R + S:]
    delta = torch.log1p(torch.exp(linear(dt, sd, f"{p}.dt_proj")))  # softplus
    a = -torch.exp(sd[f"{p}.A_log"].double())  # (E, S)
    cum = delta.cumsum(1)  # (V, L, E)
    gap = cum[:, :, None] - cum[:, None, :]  # (V, t, s, E): sum of delta over s < r <= t
    decay = torch.exp(gap[..., None] * a)  # (V, t, s, E, S)
    decay = decay * torch.ones(length, length, dtype=torch.float64).tril()[None, :, :, None, None]
    drive = (delta * x)[:, None, :, :, None] * bb[:, None, :, None, :]  # (V, 1, s, E, S)
    h = (decay * drive).sum(2)  # (V, t, E, S)
    y = (h * cc[:, :, None, :]).sum(-1) + x * sd[f"{p}.D"].double()
    return linear(y * silu(z), sd, f"{p}.out_proj")


def _bimamba_ref(x, sd, layers, norm_first=True):
    h = linear(x, sd, "input_proj")
    for i in range(layers):
        p = f"blocks.{i}"
        n = layer_norm(h, sd[f"{p}.norm.weight"], sd[f"{p}.norm.bias"], 1e-5)
        work = n if norm_first else h
        fwd = _mixer_ref(work, sd, f"{p}.forward_block")
        bwd = _mixer_ref(work.flip(1), sd, f"{p}.backward_block").flip(1)
        h = h + 0.5 * (fwd + bwd)
        if not norm_first:
            h = layer_norm(h, sd[f"{p}.norm.weight"], sd[f"{p}.norm.bias"], 1e-5)
    return linear(layer_norm(h, sd["final_norm.weight"], sd["final_norm.bias"], 1e-5), sd, "output_proj")


@pytest.mark.parametrize(("revision", "norm_first"), [("head", True), ("head", False), ("dc64bc5", True)])
def test_bimamba_keys_and_values(revision, norm_first):
    sd = random_weights(_bimamba_keys(2))
    config = {"norm_first": norm_first} if revision == "head" else {"resampler_config": {"norm_first": norm_first}}
    module = build_panollava_resampler("bi_mamba", vision_dim=D, latent_dim=OUT, revision=revision, config=config,
                                       state_dict=sd)
    module.load_state_dict(sd, strict=True)
    assert isinstance(module, BiMambaResampler)
    mixer = module.blocks[0].forward_block
    assert (mixer.d_inner, mixer.d_state, mixer.d_conv, mixer.dt_rank) == (E, S, K, R)
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(2))
    ref = _bimamba_ref(x, sd, 2, norm_first)
    with torch.no_grad():
        out = module(x)
        torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(module.double()(x.double()), ref, atol=1e-10, rtol=0)
    assert module.output_grid((2, 4), num_prefix_tokens=1) == (2, 4) and module.output_prefix_tokens(1) == 1


def test_selective_scan_step_by_step():
    gen = torch.Generator().manual_seed(5)
    v, length, e, s = 2, 6, 3, 2
    u, z = torch.randn(v, length, e, generator=gen), torch.randn(v, length, e, generator=gen)
    delta = F.softplus(torch.randn(v, length, e, generator=gen))
    a = -torch.rand(e, s, generator=gen) * 2
    b, c = torch.randn(v, length, s, generator=gen), torch.randn(v, length, s, generator=gen)
    d = torch.randn(e, generator=gen)
    out = selective_scan(u, delta, a, b, c, d, z)
    for vi in range(v):
        for ei in range(e):
            state = [0.0] * s
            for t in range(length):
                dl, ut = float(delta[vi, t, ei]), float(u[vi, t, ei])
                state = [math.exp(dl * float(a[ei, n])) * state[n] + dl * float(b[vi, t, n]) * ut for n in range(s)]
                y = sum(state[n] * float(c[vi, t, n]) for n in range(s)) + float(d[ei]) * ut
                zt = float(z[vi, t, ei])
                assert out[vi, t, ei].item() == pytest.approx(y * zt / (1 + math.exp(-zt)), abs=1e-5)


def test_mixer_defaults_match_mamba():
    mixer = MambaMixer(40, d_state=16, d_conv=4, expand=1.75)
    assert (mixer.d_inner, mixer.dt_rank) == (70, 3)  # int(expand * d_model), ceil(d_model / 16)
    torch.testing.assert_close(-torch.exp(mixer.A_log[0]), -torch.arange(1.0, 17.0))


@pytest.mark.parametrize("revision", ["head", "dc64bc5"])
def test_bimamba_mlp_fallback(revision):
    # Without mamba_ssm PanoLLaVA silently builds its MLP for "bimamba": such checkpoints hold mlp.* weights.
    shapes = {"mlp.0.weight": (H, D), "mlp.0.bias": (H,), "mlp.1.weight": (H,), "mlp.1.bias": (H,),
              "mlp.3.weight": (OUT, H), "mlp.3.bias": (OUT,)}
    sd = random_weights(shapes)
    module = build_panollava_resampler("bimamba", vision_dim=D, latent_dim=OUT, revision=revision, state_dict=sd)
    module.load_state_dict(sd, strict=True)
    assert isinstance(module, MLPResampler) and module.panollava_type == "bimamba" and module.depth == 2


def test_bimamba_config_only_builds_bimamba():
    # Without weights to tell, the type named is built (the pure-torch BiMamba).
    head = build_panollava_resampler("bimamba", vision_dim=D, latent_dim=OUT, config={"num_layers": 2})
    assert isinstance(head, BiMambaResampler) and head.num_layers == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mamba_ssm's kernels need CUDA")
def test_mixer_matches_mamba_ssm():
    mamba_ssm = pytest.importorskip("mamba_ssm", reason="mamba_ssm is not installed")
    torch.manual_seed(0)
    ref = mamba_ssm.Mamba(d_model=32, d_state=16, d_conv=4, expand=2).cuda().eval()
    with torch.no_grad():
        ref.dt_proj.bias.add_(0.5 * torch.randn_like(ref.dt_proj.bias))
        ref.D.add_(torch.randn_like(ref.D))
    ours = MambaMixer(32, d_state=16, d_conv=4, expand=2).cuda().eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 50, 32, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)
