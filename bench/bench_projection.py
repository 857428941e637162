"""Cut 8 perspective views of 224 x 224 from a 2048 x 1024 panorama: ours vs py360convert's ``e2p``.

Both run in this process on the same panorama and the same views (yaw k * 45, pitch 0, fov 90),
taking turns round by round so that both see the same load from other processes. Ours runs on two
memory layouts of the same image:

- ``HWC``: a ``(C, H, W)`` view of the very ``(H, W, C)`` float32 array that py360convert gets
  (``torch.from_numpy(hwc).permute(2, 0, 1)``, no copy); sampled by the cached-taps gather;
- ``CHW``: a contiguous ``(C, H, W)`` copy (the layout ``load_panorama`` returns); sampled by
  ``grid_sample``.

The first call of each (which builds and caches the taps / grid) is timed on its own and excluded;
py360convert gets one warm-up call too. For every timed call the wall-clock and the process CPU
time (all threads; less sensitive to other processes sharing the cores) are recorded; the minimum
and the median of each are printed, and the ratios py360convert / ours. Also prints the load
average and the agreement with py360convert.

    python bench/bench_projection.py [--repeats 30] [--threads 1 2]

Uses ``../shared/panoramas/2094501355_045ede6d89_k.jpg`` next to the repository when present, else
a random panorama.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from panoviz_callback.projection import clear_cache, erp_to_perspective

PHOTO = Path(__file__).resolve().parents[1].parent / "shared" / "panoramas" / "2094501355_045ede6d89_k.jpg"
YAWS = [k * 45.0 for k in range(8)]
SIZE = (224, 224)


def _panorama() -> tuple[np.ndarray, str]:
    """``(H, W, 3)`` float32 in [0, 1], 2048 x 1024."""
    if PHOTO.is_file():
        from PIL import Image

        with Image.open(PHOTO) as img:
            arr = np.asarray(img.convert("RGB").resize((2048, 1024)), dtype=np.float32) / 255
        return np.ascontiguousarray(arr), PHOTO.name
    return np.random.default_rng(0).random((1024, 2048, 3), dtype=np.float32), "random 2048x1024"


def _timed(fn) -> tuple[float, float]:
    """Wall-clock and process CPU time (all threads) of one call, in milliseconds."""
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - start) * 1e3, (time.process_time() - start_cpu) * 1e3


def _stats(times: list[tuple[float, float]]) -> dict[str, float]:
    wall, cpu = zip(*times)
    return {"wall_min": min(wall), "wall_med": statistics.median(wall), "cpu_min": min(cpu),
            "cpu_med": statistics.median(cpu)}


def _agreement(ours: torch.Tensor, ref: list[np.ndarray]) -> tuple[float, float]:
    """Max abs difference, and the largest per-view mean abs difference away from the border."""
    diffs = [np.abs(ours[k].permute(1, 2, 0).numpy() - ref[k]) for k in range(len(ref))]
    return max(float(d.max()) for d in diffs), max(float(d[1:-1, 1:-1].mean()) for d in diffs)


def _run(threads: int, hwc: np.ndarray, repeats: int) -> None:
    import py360convert

    torch.set_num_threads(threads)
    clear_cache()
    panos = {
        "HWC": torch.from_numpy(hwc).permute(2, 0, 1),  # (C, H, W) view of py360convert's array
        "CHW": torch.from_numpy(hwc).permute(2, 0, 1).contiguous(),  # (C, H, W) planar copy
    }
    ours = {name: (lambda p=p: erp_to_perspective(p, YAWS, 0.0, 90.0, SIZE)) for name, p in panos.items()}

    def reference() -> list[np.ndarray]:
        return [py360convert.e2p(hwc, 90.0, yaw, 0.0, SIZE, mode="bilinear") for yaw in YAWS]

    cold = {name: _timed(fn) for name, fn in ours.items()}  # builds and caches the taps / grid
    views = {name: fn() for name, fn in ours.items()}
    ref = reference()
    load_before = os.getloadavg()[0]
    times: dict[str, list[tuple[float, float]]] = {"py360convert": [], **{name: [] for name in ours}}
    for r in range(repeats):  # interleaved, alternating the order
        order = [*ours.items(), ("py360convert", reference)]
        for name, fn in order if r % 2 else order[::-1]:
            times[name].append(_timed(fn))
    load_after = os.getloadavg()[0]
    st = {name: _stats(t) for name, t in times.items()}
    rs = st["py360convert"]
    print(f"\n== torch threads: {torch.get_num_threads()}, {repeats} rounds, "
          f"load average (1 min) {load_before:.2f} -> {load_after:.2f} on {os.cpu_count()} CPUs")
    print(f"{'':22s} {'wall min':>9s} {'wall med':>9s} {'CPU min':>9s} {'CPU med':>9s}   ratio py360/ours "
          f"(wall min, wall med, CPU min, CPU med)")
    print(f"{'py360convert.e2p':22s} {rs['wall_min']:9.1f} {rs['wall_med']:9.1f} {rs['cpu_min']:9.1f} "
          f"{rs['cpu_med']:9.1f}   (first call excluded)")
    for name in ours:
        s = st[name]
        ratios = ", ".join(f"{rs[k] / s[k]:.1f}x" for k in ("wall_min", "wall_med", "cpu_min", "cpu_med"))
        print(f"{'ours, ' + name:22s} {s['wall_min']:9.1f} {s['wall_med']:9.1f} {s['cpu_min']:9.1f} "
              f"{s['cpu_med']:9.1f}   {ratios}")
    for name in ours:
        max_diff, mean_diff = _agreement(views[name], ref)
        print(f"ours, {name}: first call {cold[name][0]:.1f} ms (CPU {cold[name][1]:.1f} ms); vs py360convert: "
              f"max abs diff {max_diff:.2e}, mean abs diff (inner) {mean_diff:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                        help="torch.set_num_threads values to run in turn (default: torch's)")
    args = parser.parse_args()
    hwc, name = _panorama()
    print(f"panorama: {name} (2048x1024), 8 views of 224x224 at yaw k*45, pitch 0, fov 90; times in ms")
    for threads in args.threads:
        _run(threads, hwc, args.repeats)


if __name__ == "__main__":
    main()
