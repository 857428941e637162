"""Benchmark the start of ``panoviz``: one photo with the example checkpoint, end to end, and what it imports.

Ours: ``panoviz --checkpoint last.ckpt --image PHOTO`` as a subprocess (wall time, best of
``--repeat``), with ``-X importtime`` evidence: the cumulative import time of the heavy
packages and whether Lightning was imported at all. Reference: the same command with
``import lightning.pytorch`` done first, i.e. what the runner cost while it imported
Lightning through ``panoviz_callback.models``. Also ``python -c "import panoviz_callback"``.
Target: <= 5 s end to end on a quiet 2-core machine, and no Lightning import.

Usage::

    python bench/bench_startup.py                                   # trains the example for 1 epoch first
    python bench/bench_startup.py --checkpoint runs/demo/checkpoints/last.ckpt --image photo.jpg --repeat 5
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
_HEAVY = ("torch", "transformers", "lightning", "lightning.pytorch", "torchvision", "matplotlib", "scipy",
          "matplotlib.pyplot", "wandb", "tensorboard", "lpips")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(cmd: list[str]) -> tuple[float, float, str]:
    """``(wall seconds, CPU seconds (user + sys), stderr)`` of a subprocess (CPU time is less sensitive to load)."""
    start, cpu = time.perf_counter(), _cpu()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**_env(), "OMP_NUM_THREADS": "2"}, cwd=_ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return wall, _cpu() - cpu, proc.stderr


def _imports(stderr: str) -> dict[str, float]:
    """Cumulative seconds per top-level heavy package from ``-X importtime`` output."""
    found: dict[str, float] = {}
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)$", line)
        if m and m.group(3) in _HEAVY and m.group(3) not in found:
            found[m.group(3)] = int(m.group(1)) / 1e6
    return found


def _checkpoint(tmp: Path) -> Path:
    subprocess.run([sys.executable, "examples/train_vicreg.py", "--default_root_dir", str(tmp / "run"),
                    "--max_epochs", "1"], check=True, capture_output=True, env=_env(), cwd=_ROOT)
    return tmp / "run" / "checkpoints" / "last.ckpt"


def _photo(tmp: Path) -> Path:
    shared = sorted(Path("/work/shared/panoramas").glob("*.jpg")) if Path("/work/shared/panoramas").is_dir() else []
    if shared:
        return shared[0]
    sys.path.insert(0, str(_ROOT))
    from PIL import Image

    from panoviz_callback.panorama import synthetic_panorama

    path = tmp / "photo.png"
    Image.fromarray((synthetic_panorama(1024).permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--image", default=None)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ckpt = Path(args.checkpoint) if args.checkpoint else _checkpoint(tmp)
        photo = Path(args.image) if args.image else _photo(tmp)
        run = ["--checkpoint", str(ckpt), "--image", str(photo), "--device", "cpu"]
        ours = [sys.executable, "-X", "importtime", "-m", "panoviz_callback", *run, "--output_dir", str(tmp / "a")]
        ref = [sys.executable, "-X", "importtime", "-c",
               "import sys, lightning.pytorch; from panoviz_callback.cli import main; sys.exit(main(sys.argv[1:]))",
               *run, "--output_dir", str(tmp / "b")]
        bare = [sys.executable, "-c", "import panoviz_callback"]
        _timed(ours)  # warm the file cache
        _timed(ref)
        results: dict[str, list[float]] = {"ours": [], "ref": [], "bare": []}
        cpu: dict[str, list[float]] = {"ours": [], "ref": [], "bare": []}
        evidence = {}
        for _ in range(args.repeat):
            for key, cmd in (("ours", ours), ("ref", ref), ("bare", bare)):
                wall, seconds, stderr = _timed(cmd)
                results[key].append(wall)
                cpu[key].append(seconds)
                evidence.setdefault(key, _imports(stderr))
    best = {k: min(v) for k, v in results.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    print(f"checkpoint {ckpt.name}, image {photo.name}, best of {args.repeat}, load {os.getloadavg()[0]:.1f}")
    print(f"import panoviz_callback:                         {best['bare'] * 1e3:7.0f} ms")
    print(f"panoviz end to end (ours, no Lightning):          {best['ours']:7.2f} s   (target <= 5 s)")
    print(f"panoviz end to end with Lightning imported first: {best['ref']:7.2f} s")
    print(f"ratio reference / ours: {best['ref'] / best['ours']:.2f}x wall, "
          f"{best_cpu['ref'] / best_cpu['ours']:.2f}x CPU time (ours {best_cpu['ours']:.2f} s, "
          f"reference {best_cpu['ref']:.2f} s, import {best_cpu['bare'] * 1e3:.0f} ms)")
    for key in ("ours", "ref"):
        shown = ", ".join(f"{name} {sec:.2f} s" for name, sec in sorted(evidence[key].items(), key=lambda kv: -kv[1]))
        print(f"-X importtime ({key}): {shown}")
    print(f"Lightning imported by ours: {'lightning' in evidence['ours']}")


if __name__ == "__main__":
    main()
