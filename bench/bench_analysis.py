"""Time the analysis after the encoder forward: ours vs the original tool's way, on the same features.

Setting (issue 3, "Speed"): 8 views of 224 px cut from the synthetic probe (e2p, 90 deg FoV,
50% overlap), a ViT-B/16-shaped SigLIP vision model built from a config with random weights
(768 dims, 12 layers, 196 tokens per view). The encoder runs once; both pipelines then
analyse the same ``(8, 196, 768)`` features in one process:

- ours: :class:`panoviz_callback.Analyzer` (torch PCA, batched metrics, SSIM on warped PCA
  images) fed the cached features, plus the PCA map row at view size (``render``);
- the original way: per-view NumPy, scikit-learn PCA, a Python-loop Mahalanobis distance
  over tokens (``outlier_removal``), row-wise NumPy cosines, column-strip pairing for the
  overlap, scikit-learn cosine matrices for the Hungarian matching, NumPy CKA per pair
  (float64; linear CKA in the feature-space form ``||Y^T X||^2 / (||X^T X|| ||Y^T Y||)`` the
  original's uncentred CKA used, debiased CKA from U-centred Gram matrices), scikit-image SSIM
  in a loop over pairs, per-view scikit-image resizing.

Both compute PCA, every metric but LPIPS and the images, with the same definitions (the SSIM of
both is the mean over the window-eroded overlap). The Hungarian assignment is scipy's
``linear_sum_assignment`` on the CPU in both: that stage cannot get much faster, so the ratio is
also printed without it. Timings are the minimum of ``--repeats`` interleaved runs (other
processes share the CPU) after one warm-up run (geometry caches filled, as at every callback
firing after the first); the total is that of the fastest run.

A second section runs ours alone at the SigLIP-so400m/14-384 shape (8 views x 729 tokens x 1152
dims, features of a 2-layer random model of that width), prints the per-stage breakdown, and times
the Hungarian stage both ways in one process: the previous all-token matching (729 x 729 per pair,
float32 cosines) against ours (view i's overlap tokens against all of view j's, float64), with
their ratio.

Usage::

    python bench/bench_analysis.py [--repeats 7] [--bg_removal outlier_removal] [--threads 1 2] [--skip_vitb]

``--threads`` limits torch and the BLAS libraries of NumPy/SciPy (threadpoolctl) alike, one
comparison per value; the default 1 keeps both pipelines single-threaded, which is fair and far
less noisy on a shared 2-core machine (``0`` keeps the libraries' defaults).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections import defaultdict

import numpy as np
import torch
from torch import nn

from panoviz_callback import render
from panoviz_callback.analysis import METRICS, Analyzer
from panoviz_callback.correspondence import warp_pairs
from panoviz_callback.features import extract_features
from panoviz_callback.panorama import synthetic_panorama
from panoviz_callback.views import make_views

STAGES = ("pca", "token_cosine", "overlap_cosine", "hungarian_cosine", "hungarian_accuracy", "nn_accuracy",
          "linear_cka", "debiased_cka", "overlap_cka", "ssim", "images")
NEW_STAGES = ("nn_accuracy", "overlap_cka")  # metrics the original tool did not have (0 on its side)


def vit_b16(seed: int = 0) -> nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                patch_size=16, image_size=224, vision_use_head=False)
    return SiglipVisionModel(config).eval()


class Cached(nn.Module):
    """An 'encoder' that returns precomputed tokens: the analysis is timed without the forward."""

    def __init__(self, tokens: torch.Tensor, patch_size: int = 16) -> None:
        super().__init__()
        self.tokens = tokens
        self.patch_size = patch_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tokens


# ------------------------------------------------------------------------ ours
def make_analyzer(bg_removal, stable_colors=False):
    return Analyzer(metrics=[m for m in METRICS if m != "lpips"], bg_removal=bg_removal, normalize=None,
                    stable_colors=stable_colors)


def run_ours(views, tokens, bg_removal, analyzer=None, patch_size=16):
    """One analysis; a fresh PCA fit unless ``analyzer`` keeps the previous state (stable colours)."""
    analyzer = analyzer or make_analyzer(bg_removal)
    result = analyzer(views, Cached(tokens, patch_size))
    start = time.perf_counter()
    render.pca_grid_image(result, "vision_encoder")  # the PCA maps at view size, as logged and drawn
    images = time.perf_counter() - start
    t = result.timings
    level = "vision_encoder"
    stages = {
        "pca": t[f"{level}/pca"],
        "token_cosine": t[f"{level}/token_cosine"],
        # the correspondence is shared by the overlap metrics; charge it to overlap_cosine
        "overlap_cosine": t[f"{level}/overlap_cosine"] + t.get(f"{level}/correspondence", 0.0),
        "hungarian_cosine": t[f"{level}/hungarian_cosine"],
        "hungarian_accuracy": t[f"{level}/hungarian_accuracy"],
        "nn_accuracy": t.get(f"{level}/nn_accuracy", 0.0),
        "linear_cka": t[f"{level}/linear_cka"],
        "debiased_cka": t[f"{level}/debiased_cka"],
        "overlap_cka": t.get(f"{level}/overlap_cka", 0.0),
        "ssim": t[f"{level}/ssim"] + t[f"{level}/warp"],
        "images": images,
    }
    return stages, result


# ----------------------------------------------------------- the original way
def _sk_pca(x, k):
    from sklearn.decomposition import PCA

    return PCA(n_components=k).fit(x)


def original_pca(feats, grid, bg_removal):
    """sklearn PCA over all tokens, per-view transforms; Mahalanobis distance in a Python loop."""
    all_tokens = np.concatenate(feats, axis=0)  # (V*N, D)
    keep = np.ones(len(all_tokens), dtype=bool)
    if bg_removal == "outlier_removal":
        mean = all_tokens.mean(axis=0)
        inv = np.linalg.pinv(np.cov(all_tokens, rowvar=False))
        dist = []
        for token in all_tokens:  # one token at a time, as the original did
            diff = token - mean
            dist.append(math.sqrt(max(float(diff @ inv @ diff), 0.0)))
        keep = np.asarray(dist) <= np.percentile(dist, 95)
    elif bg_removal == "threshold":
        first = _sk_pca(all_tokens, 1).transform(all_tokens)[:, 0]
        first = (first - first.min()) / (first.max() - first.min() + 1e-8)
        keep = first >= 0.5
    pca = _sk_pca(all_tokens[keep], 3)
    coords = [pca.transform(f) for f in feats]
    stacked = np.concatenate(coords)[keep]
    lo, hi = np.percentile(stacked, 2, axis=0), np.percentile(stacked, 98, axis=0)
    images = []
    for c in coords:
        rgb = np.clip((c - lo) / (hi - lo + 1e-8), 0, 1)
        images.append(rgb.reshape(grid[0], grid[1], 3))
    return images


def _cos_matrix(a, b):
    from sklearn.metrics.pairwise import cosine_similarity

    return cosine_similarity(a, b)


def original_token_cosine(feats, pairs):
    """Row-wise cosine of same-index tokens, per pair (NumPy; no N x N matrix for its diagonal)."""
    out = []
    for i, j in pairs:
        a, b = feats[i], feats[j]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-8)
        out.append(float(cos.mean()))
    return out


def _strip_columns(views, i, j, gw):
    """The original pairing: the right strip of view i against the left strip of view j."""
    ci, cj = views.cameras[i], views.cameras[j]
    dyaw = abs((cj.yaw_deg - ci.yaw_deg + 180) % 360 - 180)
    return max(0, round(gw * (1 - dyaw / ci.fov_deg)))


def original_overlap_cosine(feats, views, pairs, grid):
    gh, gw = grid
    out = []
    for i, j in pairs:
        k = _strip_columns(views, i, j, gw)
        a, b = feats[i].reshape(gh, gw, -1), feats[j].reshape(gh, gw, -1)
        sims = []
        for r in range(gh):
            for c in range(k):
                u, v = a[r, gw - k + c], b[r, c]
                sims.append(float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v) + 1e-8)))
        out.append(float(np.mean(sims)) if sims else math.nan)
    return out


def original_hungarian(feats, pairs):
    from scipy.optimize import linear_sum_assignment

    out = []
    for i, j in pairs:
        sim = _cos_matrix(feats[i], feats[j])
        rows, cols = linear_sum_assignment(-sim)
        out.append((float(sim[rows, cols].mean()), cols))
    return out


def original_hungarian_accuracy(matches, views, pairs, grid):
    gh, gw = grid
    out = []
    for (i, j), (_, cols) in zip(pairs, matches):
        k = _strip_columns(views, i, j, gw)
        hits = total = 0
        for r in range(gh):
            for c in range(k):
                got = cols[r * gw + gw - k + c]
                hits += abs(got // gw - r) <= 1 and abs(got % gw - c) <= 1
                total += 1
        out.append(hits / total if total else math.nan)
    return out


def original_linear_cka(x, y):
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def _unbiased_centre(gram):
    n = gram.shape[0]
    gram = gram.copy()
    np.fill_diagonal(gram, 0)
    means = gram.sum(0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    gram -= means[:, None]
    gram -= means[None, :]
    np.fill_diagonal(gram, 0)
    return gram


def original_debiased_cka(x, y):
    gx, gy = _unbiased_centre(x @ x.T), _unbiased_centre(y @ y.T)
    return float((gx.ravel() @ gy.ravel()) / (np.linalg.norm(gx) * np.linalg.norm(gy)))


def original_ssim(ref, warped, mask):
    """scikit-image SSIM per pair, averaged over the overlap.

    The same definition as ours: the valid region (a border of r = 5 px left out, as skimage's
    own mean does) where the whole 11 x 11 window lies inside the overlap (eroded mask).
    """
    from scipy.ndimage import binary_erosion
    from skimage.metrics import structural_similarity

    r = 5
    out = []
    for a, b, m in zip(ref, warped, mask):
        _, smap = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                        data_range=1.0, channel_axis=-1, full=True)
        smap = smap.mean(-1)[r:-r, r:-r]
        inside = binary_erosion(m, structure=np.ones((2 * r + 1, 2 * r + 1), dtype=bool))[r:-r, r:-r]
        out.append(float(smap[inside].mean()) if inside.any() else math.nan)
    return out


def original_images(images, size):
    from skimage.transform import resize

    return [resize(img, (size, size), order=0, anti_aliasing=False) for img in images]


def run_original(views, tokens, bg_removal, grid, metric_images):
    """The same work, the original tool's way. ``metric_images``: our warped PCA images (same inputs)."""
    stages = {}
    pairs = list(views.pairs)

    def timed(name, fn, *args):
        start = time.perf_counter()
        value = fn(*args)
        stages[name] = time.perf_counter() - start
        return value

    feats = timed("pca", lambda: [t.numpy() for t in tokens])
    images = timed("pca_", original_pca, feats, grid, bg_removal)
    stages["pca"] += stages.pop("pca_")
    values = {"token_cosine": timed("token_cosine", original_token_cosine, feats, pairs),
              "overlap_cosine": timed("overlap_cosine", original_overlap_cosine, feats, views, pairs, grid)}
    matches = timed("hungarian_cosine", original_hungarian, feats, pairs)
    values["hungarian_cosine"] = [m[0] for m in matches]
    values["hungarian_accuracy"] = timed("hungarian_accuracy", original_hungarian_accuracy, matches, views, pairs, grid)
    f64 = [f.astype(np.float64) for f in feats]
    values["linear_cka"] = timed("linear_cka", lambda: [original_linear_cka(f64[i], f64[j]) for i, j in pairs])
    values["debiased_cka"] = timed("debiased_cka", lambda: [original_debiased_cka(f64[i], f64[j]) for i, j in pairs])
    values["ssim"] = timed("ssim", original_ssim, *metric_images)
    timed("images", original_images, images, views.image_size)
    stages.update(dict.fromkeys(NEW_STAGES, 0.0))
    return stages, values


def _metric_inputs(result, views):
    """The warped PCA image pairs the SSIM of both pipelines compares (HWC NumPy)."""
    from panoviz_callback.analysis import _metric_images

    big = _metric_images(result.levels["vision_encoder"].pca_images)
    warped, mask = warp_pairs(big, views, views.pairs)
    ref = big[[i for i, _ in views.pairs]]
    hwc = lambda t: t.permute(0, 2, 3, 1).numpy().astype(np.float64)  # noqa: E731
    return hwc(ref), hwc(warped), mask.numpy()


HUNGARIAN = ("hungarian_cosine", "hungarian_accuracy")


def _min_total(runs: dict[str, list[float]], stages=STAGES) -> float:
    """The fastest run's total (the sum of the stages of one run, not of the per-stage minima)."""
    return min(sum(vals) for vals in zip(*(runs[s] for s in stages)))


def _settle() -> None:
    """Let the worker threads of the other library (OpenMP, OpenBLAS) stop spinning before the next timing."""
    time.sleep(0.3)


def compare(views, tokens, grid, forward, args) -> None:
    """Run both pipelines ``--repeats`` times, interleaved, and print the table and the ratios."""
    _settle()
    cold, result = run_ours(views, tokens, args.bg_removal)
    metric_images = _metric_inputs(result, views)
    run_original(views, tokens, args.bg_removal, grid, metric_images)  # warm-up (imports)
    ours_runs, warm_runs, orig_runs = defaultdict(list), defaultdict(list), defaultdict(list)
    warm_analyzer = make_analyzer(args.bg_removal, stable_colors=True)
    run_ours(views, tokens, args.bg_removal, warm_analyzer)  # leaves a PCA state, as the previous firing does
    pause = _settle if torch.get_num_threads() > 1 else (lambda: None)
    for _ in range(args.repeats):
        pause()
        stages, result = run_ours(views, tokens, args.bg_removal)
        for k, v in stages.items():
            ours_runs[k].append(v)
        pause()
        stages, _ = run_ours(views, tokens, args.bg_removal, warm_analyzer)
        for k, v in stages.items():
            warm_runs[k].append(v)
        pause()
        stages, orig_values = run_original(views, tokens, args.bg_removal, grid, metric_images)
        for k, v in stages.items():
            orig_runs[k].append(v)
    ours, warm, orig = ({k: min(v) for k, v in runs.items()} for runs in (ours_runs, warm_runs, orig_runs))
    ours_total, warm_total, orig_total = (_min_total(r) for r in (ours_runs, warm_runs, orig_runs))
    rest = [s for s in STAGES if s not in HUNGARIAN]
    ours_rest, warm_rest, orig_rest = (_min_total(r, rest) for r in (ours_runs, warm_runs, orig_runs))
    ours_hung, orig_hung = (_min_total(r, HUNGARIAN) for r in (ours_runs, orig_runs))

    print(f"\n{torch.get_num_threads()} thread(s): min of {args.repeats} interleaved runs (wall clock); 'ours' "
          f"fits the PCA from scratch (runner), 'ours warm' starts from the previous PCA state (callback firings "
          f"after the first)")
    print(f"{'stage':<20}{'ours (ms)':>11}{'original (ms)':>15}{'speed-up':>10}{'ours warm (ms)':>16}")
    for stage in STAGES:
        a, b, w = ours[stage] * 1e3, orig[stage] * 1e3, warm[stage] * 1e3
        if stage in NEW_STAGES:
            print(f"{stage:<20}{a:>11.1f}{'(none)':>15}{'':>10}{w:>16.1f}")
            continue
        print(f"{stage:<20}{a:>11.1f}{b:>15.1f}{b / max(a, 1e-9):>9.1f}x{w:>16.1f}")
    print(f"{'TOTAL (fastest run)':<20}{ours_total * 1e3:>11.1f}{orig_total * 1e3:>15.1f}"
          f"{orig_total / ours_total:>9.1f}x{warm_total * 1e3:>16.1f}")
    print(f"{'  Hungarian only':<20}{ours_hung * 1e3:>11.1f}{orig_hung * 1e3:>15.1f}{orig_hung / ours_hung:>9.1f}x")
    print(f"{'  all but Hungarian':<20}{ours_rest * 1e3:>11.1f}{orig_rest * 1e3:>15.1f}"
          f"{orig_rest / ours_rest:>9.1f}x{warm_rest * 1e3:>16.1f}")
    print("(linear_cka includes the per-view Gram matrices that debiased_cka reuses; token_cosine the unit "
          "tokens the cosine stages share; ssim the warp; ours computes nn_accuracy and overlap_cka on top, "
          "and matches only view i's overlap tokens)")
    print(f"\nours, first (cold) call: {sum(cold.values()) * 1e3:.1f} ms (geometry caches empty)")
    top = max(STAGES, key=lambda s: ours[s])
    print(f"ours, largest stage: {top} ({ours[top] / ours_total:.0%} of the analysis); the exact Hungarian "
          f"assignment (scipy, the same solver in both) is {ours_hung / ours_total:.0%} of ours")
    print(f"speed-up ours vs original: {orig_total / ours_total:.1f}x fresh PCA, {orig_total / warm_total:.1f}x warm "
          f"(target >= 10x); without the Hungarian stages: {orig_rest / ours_rest:.1f}x fresh, "
          f"{orig_rest / warm_rest:.1f}x warm")
    print(f"analysis / encoder forward: {ours_total / forward:.1%} fresh PCA, {warm_total / forward:.1%} warm "
          f"(target < 10%)")

    m = result.levels["vision_encoder"].metrics
    print("\nsanity (means, ours vs original; overlap and Hungarian accuracy differ by design: geometric "
          "correspondence vs column strips):")
    for name in ("token_cosine", "linear_cka", "debiased_cka", "ssim", "overlap_cosine", "hungarian_cosine",
                 "hungarian_accuracy"):
        print(f"  {name:<18} {m[name].mean:8.4f} {float(np.nanmean(orig_values[name])):8.4f}")
    acc = m["hungarian_accuracy"]
    print(f"  hungarian_accuracy chance {acc.chance:.4f}, ceiling {acc.ceiling:.4f}; nn_accuracy "
          f"{m['nn_accuracy'].mean:.4f}; overlap_cka {m['overlap_cka'].mean:.4f}, overlap_debiased_cka "
          f"{m['overlap_debiased_cka'].mean:.4f}")


# ------------------------------------------------------------- so400m shape
def so400m(seed: int = 0) -> nn.Module:
    """SigLIP-so400m/14-384 widths (1152 dims, 27 x 27 tokens of 14 px at 384 px) with 2 layers: the shape of
    its features, at a fraction of the forward cost (the analysis only sees the features)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=2, num_attention_heads=16,
                                patch_size=14, image_size=384, vision_use_head=False)
    return SiglipVisionModel(config).eval()


def all_token_hungarian(units, idx_i, idx_j):
    """The previous matching (the reference): every token of view i against every token of view j, float32
    cosines, the row- and column-reduced square matrices solved by scipy in the same thread pool."""
    from panoviz_callback.metrics.matching import _solve_all

    sims = torch.bmm(units[idx_i], units[idx_j].transpose(1, 2))  # (P, N, N) float32
    return _solve_all(list(sims.cpu().double().numpy()))


def overlap_hungarian_stage(units, idx_i, idx_j, idx_a):
    """Ours: view i's overlap tokens against all of view j's, float64 (what the analysis runs)."""
    from panoviz_callback import metrics as m

    sims = m._overlap_sims(units, idx_i, idx_j, idx_a)
    return m._overlap_hungarian_views(sims, idx_a, units.shape[1])


def compare_so400m(args) -> None:
    """Per-stage breakdown of ours at 8 x 729 x 1152, and the Hungarian stage: overlap vs all-token matching."""
    from panoviz_callback import metrics as m
    from panoviz_callback.correspondence import patch_correspondence

    views = make_views(synthetic_panorama(512), "e2p", image_size=384)
    with torch.no_grad():
        feats = extract_features(so400m(), views.pixels)
    tokens, grid = feats.tokens, feats.grid_hw
    print(f"\n=== so400m shape: features {tuple(tokens.shape)}, grid {grid}, {torch.get_num_threads()} thread(s)")
    run_ours(views, tokens, args.bg_removal, patch_size=14)  # warm-up: geometry caches
    runs = defaultdict(list)
    for _ in range(args.repeats):
        stages, result = run_ours(views, tokens, args.bg_removal, patch_size=14)
        for k, v in stages.items():
            runs[k].append(v)
    best = {k: min(v) for k, v in runs.items()}
    total = _min_total(runs)
    print(f"{'stage':<20}{'ours (ms)':>11}{'share':>8}")
    for stage in STAGES:
        print(f"{stage:<20}{best[stage] * 1e3:>11.1f}{best[stage] / total:>8.0%}")
    print(f"{'TOTAL (fastest run)':<20}{total * 1e3:>11.1f}")

    units = m._unit(tokens)
    idx_i = torch.tensor([i for i, _ in views.pairs])
    idx_j = torch.tensor([j for _, j in views.pairs])
    corr = [patch_correspondence(views, i, j, grid) for i, j in views.pairs]
    idx_a = [c[0] for c in corr]
    old, new = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        all_token_hungarian(units, idx_i, idx_j)
        old.append(time.perf_counter() - start)
        start = time.perf_counter()
        overlap_hungarian_stage(units, idx_i, idx_j, idx_a)
        new.append(time.perf_counter() - start)
    k = sum(len(a) for a in idx_a) / len(idx_a)
    print(f"Hungarian stage, min of {args.repeats}: all-token {tokens.shape[1]}x{tokens.shape[1]} float32 "
          f"{min(old) * 1e3:.1f} ms; overlap {k:.0f}x{tokens.shape[1]} float64 {min(new) * 1e3:.1f} ms; "
          f"speed-up {min(old) / min(new):.1f}x (target >= 3x)")
    met = result.levels["vision_encoder"].metrics
    acc = met["hungarian_accuracy"]
    print(f"hungarian_accuracy {acc.mean:.4f} (chance {acc.chance:.4f}, ceiling {acc.ceiling:.4f}); nn_accuracy "
          f"{met['nn_accuracy'].mean:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bg_removal", default="outlier_removal",
                        choices=("threshold", "remove_first_pc", "outlier_removal", "none"))
    parser.add_argument("--skip_vitb", action="store_true", help="only the so400m-shape section")
    parser.add_argument("--threads", type=int, nargs="+", default=[1],
                        help="threads for torch and BLAS in both pipelines, one comparison per value "
                             "(0: the libraries' defaults)")
    args = parser.parse_args()

    views = make_views(synthetic_panorama(512), "e2p", image_size=224)
    encoder = vit_b16()
    print(f"probe: {len(views)} views of {views.image_size} px, {len(views.pairs)} pairs; torch {torch.__version__}; "
          f"bg_removal={args.bg_removal}")
    for threads in args.threads:
        limits = contextlib.nullcontext()
        if threads:
            from threadpoolctl import threadpool_limits

            torch.set_num_threads(threads)
            limits = threadpool_limits(threads)
        with limits, torch.no_grad():
            extract_features(encoder, views.pixels[:1])  # warm-up
            forwards = []
            for _ in range(2):
                start = time.perf_counter()
                feats = extract_features(encoder, views.pixels)
                forwards.append(time.perf_counter() - start)
            forward = min(forwards)
            print(f"\n=== {torch.get_num_threads()} thread(s): encoder forward (ViT-B/16 SigLIP, random weights, "
                  f"8 x 224 px, no_grad): {forward:.3f} s -> features {tuple(feats.tokens.shape)}")
            if not args.skip_vitb:
                compare(views, feats.tokens, feats.grid_hw, forward, args)
            compare_so400m(args)


if __name__ == "__main__":
    main()
