"""Added cost per firing of the opt-in ``inside`` parts, at ViT-B/16 shape (8 views, 12 layers).

A randomly initialised SigLIP of ViT-B/16 shape (hidden 768, 12 layers, 12 heads, 224 px, 196
tokens per view; no weights are downloaded) and this package's QFormer resampler (32 queries,
2 layers) analyse the 8 ``e2p`` views of the synthetic probe. Per configuration, the median of
``--repeats`` firings (after one warm-up call that fills the geometry caches) of

- the whole analysis (``Analyzer.__call__``), its encoder + resampler forwards (with the hooks)
  and its ``inside`` stage (the recomputation, sphere maps, sweep metrics and panoramas, from
  ``AnalysisResult.timings``); "added" = inside stage + forwards - the default's forwards;
- the logger images of the inside part (``inside_images``, matplotlib),

against the default firing (``inside=None``). The forwards dominate on a CPU and are noisy on a
shared machine; the inside stage is the steadier number. Two reference ways are timed in the same process:

- layer sweep: one ``extract_features`` forward per hidden state (13 forwards) against the sweep's
  one forward (``extract_layers``), printed as a ratio;
- attention: a second forward of an eager copy with ``output_attentions=True`` (how attention maps
  are usually read) against the hooks + recomputation.

Usage::

    python bench/bench_inside.py [--repeats 3] [--threads N] [--device cpu|cuda] [--metrics default|cheap]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def _median_time(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--metrics", choices=("default", "cheap"), default="default",
                        help="default: every metric (the callback's default); cheap: token/overlap cosine, linear CKA")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import SiglipVisionConfig, SiglipVisionModel

    from panoviz_callback.analysis import Analyzer
    from panoviz_callback.features import extract_features, extract_layers
    from panoviz_callback.inside_render import inside_images
    from panoviz_callback.models import build_resampler
    from panoviz_callback.panorama import synthetic_panorama
    from panoviz_callback.views import make_views

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
               patch_size=16, vision_use_head=False)
    encoder = SiglipVisionModel(SiglipVisionConfig(**cfg, attn_implementation="sdpa")).eval().to(device)
    eager = SiglipVisionModel(SiglipVisionConfig(**cfg, attn_implementation="eager")).eval().to(device)
    eager.load_state_dict(encoder.state_dict())
    resampler = build_resampler("qformer", 768, 768, num_queries=32, depth=2).eval().to(device)
    views = make_views(synthetic_panorama(512), "e2p", image_size=224).to(device)
    metrics = None if args.metrics == "default" else ["token_cosine", "overlap_cosine", "linear_cka"]
    print(f"ViT-B/16 shape (random SigLIP, 12 layers, 768 dims), {len(views)} views of 224 px, QFormer 32 queries; "
          f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, metrics {args.metrics}, "
          f"median of {args.repeats}")

    configs = {
        "default (inside=None)": None,
        "+ layer sweep (layers='all')": {"layers": "all"},
        "+ attention maps": {"attention": True},
        "+ agreement panorama": {"agreement": True},
        "everything (inside=True)": True,
    }
    base = None
    print(f"{'configuration':30s} {'firing s':>9s} {'forwards s':>10s} {'inside stage s':>14s} {'added s':>8s} "
          f"{'images s':>9s}")
    for label, inside in configs.items():
        analyzer = Analyzer(metrics=metrics, inside=inside)
        runs = []
        with torch.no_grad():
            result = analyzer(views, encoder, resampler)  # warm-up: geometry caches, LPIPS note
            for _ in range(args.repeats):
                runs.append(analyzer(views, encoder, resampler).timings)
        total = statistics.median(t["total"] for t in runs)
        forwards = statistics.median(t["encoder"] + t["resampler"] for t in runs)
        stage = statistics.median(t.get("inside", 0.0) for t in runs)
        base = forwards if base is None else base
        added = stage + forwards - base  # the inside stage, plus the hooks' cost in the forwards
        images = _median_time(lambda: inside_images(result), args.repeats, device) if inside else 0.0
        print(f"{label:30s} {total:9.3f} {forwards:10.3f} {stage:14.3f} {added:+8.3f} {images:9.3f}")

    with torch.no_grad():
        one = _median_time(lambda: extract_layers(encoder, views.pixels, list(range(13))), args.repeats, device)
        separate = _median_time(lambda: [extract_features(encoder, views.pixels, layer=k) for k in range(13)],
                                max(1, args.repeats // 2), device)
        plain = _median_time(lambda: extract_features(encoder, views.pixels), args.repeats, device)
        reread = _median_time(lambda: eager(pixel_values=views.pixels * 2 - 1, output_attentions=True),
                              args.repeats, device)
    print(f"layer sweep encoder states: one forward {one:.3f} s vs 13 separate forwards {separate:.3f} s "
          f"(x{separate / one:.1f} faster)")
    print(f"attention reference: an extra eager forward with output_attentions {reread:.3f} s "
          f"(a plain forward is {plain:.3f} s)")


if __name__ == "__main__":
    main()
