"""Cost of ``PanoVizCallback``: epoch time of the CPU example with and without it, in one process.

Runs ``examples/train_vicreg.py``'s default setup (synthetic panoramas, tiny SigLIP, MLP
resampler, TensorBoard logging, ``every_n_epochs=1``) alternately without and with the
callback (A B A B ...), drops each run's first epoch (warm-up, it also renders the
synthetic panoramas), and prints, in wall-clock and in process CPU time, the median epoch
time of both, their ratio, and the median time of one firing (the probe forward, the
analysis, the images and the TensorBoard writes) relative to an epoch without it. The
target is an overhead of at most 5 %. Timings are noisy on a shared machine; the
firing/epoch ratio in CPU time is the steadiest number. On an oversubscribed machine
torch's default of one thread per core makes every small op wait for a busy core;
``--threads 1`` shows the cost without that effect.

Usage::

    python bench/bench_callback.py [--epochs 4] [--rounds 2] [--threads N] [example flags ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, seed_everything

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_vicreg.py"


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


class _EpochTimer(Callback):
    """``(wall, process CPU)`` seconds of every training epoch, firing included (it runs after the callback)."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []
        self._start = (0.0, 0.0)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._start = _clock()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.times.append(_since(self._start))


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("_train_vicreg", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(example: Any, flags: list[str], with_callback: bool, root: str) -> tuple[list[tuple], list[tuple]]:
    """``(epoch times, firing times)`` of one training run, warm-up epoch dropped."""
    args = example.build_parser().parse_args([*flags, "--default_root_dir", root,
                                              *([] if with_callback else ["--no_callback"])])
    seed_everything(args.seed, verbose=False)
    model, data, trainer, handles = example.build(args)
    timer = _EpochTimer()
    trainer.callbacks.insert(len(trainer.callbacks) - 1, timer)  # after PanoVizCallback, before ModelCheckpoint
    firings: list[tuple[float, float]] = []
    cb = handles.get("panoviz")
    if cb is not None:
        fire = cb._fire

        def timed_fire(*a: Any) -> None:
            start = _clock()
            fire(*a)
            firings.append(_since(start))

        cb._fire = timed_fire
    trainer.fit(model, datamodule=data)
    return timer.times[1:], firings[1:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (the first one is dropped)")
    parser.add_argument("--rounds", type=int, default=2, help="A/B pairs of runs")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args, flags = parser.parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    flags = ["--accelerator", "cpu", "--devices", "1", "--max_epochs", str(args.epochs), *flags]
    example = _example()
    without: list[tuple[float, float]] = []
    with_cb: list[tuple[float, float]] = []
    firings: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            without += _run(example, flags, False, f"{tmp}/a{r}")[0]
            epochs, fire = _run(example, flags, True, f"{tmp}/b{r}")
            with_cb += epochs
            firings += fire
    print(f"torch threads: {torch.get_num_threads()}, load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for k, clock in enumerate(("wall", "CPU")):
        base, timed = statistics.median(t[k] for t in without), statistics.median(t[k] for t in with_cb)
        fire = statistics.median(t[k] for t in firings)
        print(f"[{clock}] epoch without callback: {base:.3f} s, with: {timed:.3f} s (medians of {len(without)} and "
              f"{len(with_cb)}); ratio {timed / base:.3f} ({100 * (timed / base - 1):+.1f} %); one firing "
              f"{fire:.3f} s = {100 * fire / base:.1f} % of an epoch without it (target <= 5 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
