"""Benchmark the checkpoint runner: one ``panoviz`` run over N panoramas vs N runs of one panorama each.

The original workflow re-ran the whole script per image (imports, model building and
checkpoint loading every time); ``panoviz`` loads the model once. Both sides are real
command-line invocations (subprocesses) on the same checkpoint and images, so start-up
costs count on both sides. Target: ratio >= 3 for 10 images.

Usage::

    python bench/bench_runner.py                 # 10 synthetic panoramas, 224 px views
    python bench/bench_runner.py --images 10 --image_size 224 --height 512 --device cpu

Steps: train a tiny ``PanoVisionModule`` for one epoch with ``PanoVizCallback`` and
``ModelCheckpoint(save_last=True)`` in a temporary folder, write ``synthetic_panorama``
PNGs with different seeds, time both ways, check that both give identical reports, print
the two times and the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _train(root: Path, image_size: int) -> Path:
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    from panoviz_callback import PanoVizCallback
    from panoviz_callback.models import PanoDataModule, PanoVisionModule

    seed_everything(0, verbose=False)
    model = PanoVisionModule("tiny", vision_overrides={"image_size": image_size}, image_size=image_size,
                             projector_dim=64)
    data = PanoDataModule(num_synthetic=2, synthetic_height=128, image_size=image_size, batch_size=2)
    callback = PanoVizCallback(crop_strategy="e2p", image_size=image_size, log_images=False)
    trainer = Trainer(default_root_dir=root, max_epochs=1, accelerator="cpu", devices=1, logger=False,
                      callbacks=[callback, ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)],
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    return root / "checkpoints" / "last.ckpt"


def _panoramas(root: Path, count: int, height: int) -> list[Path]:
    from PIL import Image

    from panoviz_callback.panorama import synthetic_panorama

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        pano = synthetic_panorama(height, seed=100 + seed)
        array = (pano.permute(1, 2, 0) * 255).round().byte().numpy()
        paths.append(root / f"pano_{seed:02d}.png")
        Image.fromarray(array).save(paths[-1])
    return paths


def _panoviz(*args: object) -> float:
    cmd = [sys.executable, "-m", "panoviz_callback", *map(str, args)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"panoviz failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr}")
    return seconds


def _reports(folder: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(folder.rglob("similarity_*.json")):
        data = json.loads(path.read_text())
        data.pop("image", None)
        out[path.parent.name] = data
    return out


def _differences(a: object, b: object, where: str = "") -> list[tuple[str, float]]:
    """``(path, |a - b|)`` for every number that differs; ``inf`` for a structural difference."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [(where, float("inf"))]
        return [d for k in a for d in _differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [(where, float("inf"))]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if a == b else [(where, abs(a - b))]
    return [] if a == b else [(where, float("inf"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10, help="number of panoramas (default 10)")
    parser.add_argument("--height", type=int, default=256, help="panorama height in px (width 2x; default 256)")
    parser.add_argument("--image_size", type=int, default=224, help="view size (default 224)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="panoviz-bench-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        ckpt = _train(root / "run", args.image_size)
        images = _panoramas(root / "panos", args.images, args.height)
        print(f"setup: tiny checkpoint + {len(images)} panoramas ({2 * args.height}x{args.height}) in "
              f"{time.perf_counter() - start:.1f} s; views {args.image_size} px, device {args.device}")

        batch = _panoviz("--checkpoint", ckpt, "--image", *images, "--output_dir", root / "batch",
                         "--device", args.device)
        singles = [_panoviz("--checkpoint", ckpt, "--image", image, "--output_dir", root / "single" / image.stem,
                            "--device", args.device) for image in images]
        single = sum(singles)

        diffs = _differences(_reports(root / "batch"), _reports(root / "single"))
        ratio = single / batch
        print(f"one invocation, {len(images)} images:      {batch:8.2f} s  ({batch / len(images):.2f} s per image)")
        print(f"{len(images)} invocations, 1 image each:   {single:8.2f} s  ({single / len(images):.2f} s per "
              f"invocation, min {min(singles):.2f} s)")
        print(f"ratio: {ratio:.2f}x (target >= 3x: {'met' if ratio >= 3 else 'NOT met'})")
        if not diffs:
            print("reports of the two ways: identical")
        else:
            where, worst = max(diffs, key=lambda d: d[1])
            print(f"reports of the two ways: {len(diffs)} value(s) differ, max |difference| {worst:.2e} at {where}")


if __name__ == "__main__":
    main()
