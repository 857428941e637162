"""Cut 8 perspective views of 224 x 224 from a 2048 x 1024 panorama: ours vs py360convert's ``e2p``.

Both run in this process on the same panorama and the same views (yaw k * 45, pitch 0, fov 90),
after a warm-up (our sampling grid and py360convert's sampler are both cached after the first
call). Prints the median wall-clock time of each, the ratio and the largest pixel difference, and
the process CPU time (less sensitive to other processes sharing the cores).

    python bench/bench_projection.py [--repeats 40] [--threads N]

Uses ``../shared/panoramas/*.jpg`` next to the repository when present, else a random panorama.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from panoviz_callback.projection import erp_to_perspective

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "panoramas"
YAWS = [k * 45.0 for k in range(8)]


def _panorama() -> tuple[torch.Tensor, str]:
    photos = sorted(SHARED.glob("*.jpg"))
    if photos:
        from PIL import Image

        with Image.open(photos[0]) as img:
            arr = np.asarray(img.convert("RGB").resize((2048, 1024)), dtype=np.float32) / 255
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), photos[0].name
    return torch.rand(3, 1024, 2048, generator=torch.Generator().manual_seed(0)), "random 2048x1024"


def _timed(fn) -> tuple[float, float]:
    """Wall-clock and process CPU time (all threads) of one call, in milliseconds."""
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - start) * 1e3, (time.process_time() - start_cpu) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import py360convert

    pano, name = _panorama()
    hwc = np.ascontiguousarray(pano.permute(1, 2, 0).numpy())

    def ours() -> torch.Tensor:
        return erp_to_perspective(pano, YAWS, 0.0, 90.0, (224, 224))

    def reference() -> list[np.ndarray]:
        return [py360convert.e2p(hwc, 90.0, yaw, 0.0, (224, 224), mode="bilinear") for yaw in YAWS]

    start = time.perf_counter()
    views = ours()  # builds and caches the sampling grid
    cold_ms = (time.perf_counter() - start) * 1e3
    ref = reference()
    ours()
    # interleaved, so that both see the same load from other processes on the shared cores
    ours_t, ref_t = [], []
    for r in range(args.repeats):
        ours_t.append(_timed(ours))
        if r % 4 == 0:
            ref_t.append(_timed(reference))
    ours_ms, ours_cpu = (statistics.median(t) for t in zip(*ours_t))
    ref_ms, ref_cpu = (statistics.median(t) for t in zip(*ref_t))
    diff = max(float(np.abs(views[k].permute(1, 2, 0).numpy() - ref[k]).max()) for k in range(8))
    print(f"panorama: {name}, 8 views of 224x224, torch threads: {torch.get_num_threads()}")
    print(f"ours (first call, builds the grid): {cold_ms:8.1f} ms")
    print(f"ours (median of {args.repeats}):          {ours_ms:8.1f} ms  (CPU time {ours_cpu:.1f} ms)")
    print(f"py360convert.e2p (median of {len(ref_t)}):  {ref_ms:8.1f} ms  (CPU time {ref_cpu:.1f} ms)")
    print(f"ratio py360convert / ours:         {ref_ms / ours_ms:8.1f}x  (CPU time {ref_cpu / ours_cpu:.1f}x)")
    print(f"max abs pixel difference:          {diff:.2e}")


if __name__ == "__main__":
    main()
