"""The ``panoviz`` command line: analyse checkpoints on panoramas, and compare runs.

Usage::

    panoviz --checkpoint runs/exp/checkpoints/last.ckpt                  # the callback's own probe
    panoviz --checkpoint last.ckpt --image room.jpg panos/ "more/*.png" --crop_strategy anyres_e2p
    panoviz --checkpoint panollava.ckpt --config config.yaml --image room.jpg
    panoviz --checkpoint other.ckpt --module my_pkg.model:MyVLM --encoder model.vision_tower --image room.jpg
    panoviz compare results/trained_viz/demo-epoch=0 results/trained_viz/demo-last --labels before after

Exit status: 0 success; 1 a runtime failure (an image that could not be analysed, the
others are still written; weights that do not fit the model; an error while analysing
or writing); 2 a usage error, where nothing was analysed: a wrong option or value, a
``--checkpoint`` that is missing or not a checkpoint, no model description without
``--config``/``--module``, a ``--config`` that is not valid YAML or misses keys, a
``--module`` that cannot be imported, an ``--image`` that names nothing, ``--device cuda``
without CUDA, an ``--output_dir`` that cannot be written. Problems are printed one per
line on stderr (``--debug`` adds tracebacks); ``Ctrl-C`` exits with 130 and SIGTERM with 143
(the image being written is finished or rolled back).

torch, lightning and transformers are imported only after the arguments are parsed, so
``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from pathlib import Path
from typing import NoReturn

from panoviz_callback import __version__

__all__ = ["main"]

# ``views.STRATEGIES``, repeated here because views imports torch and `--help` must not.
_STRATEGIES = ("e2p", "anyres_e2p", "cubemap", "sliding_window")
_BG_MODES = ("threshold", "remove_first_pc", "outlier_removal", "none")
_DEFAULT_ROOT = Path("results") / "trained_viz"
_AGREEMENT_TOL = 1e-4


class _UsageExit(Exception):
    """Raised by the parser instead of exiting, so that ``main`` returns the code."""

    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageExit(2, f"{message} (see {self.prog} --help)")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            print(message, end="", file=sys.stderr)
        raise _UsageExit(status)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, Slurm, Docker) handled like Ctrl-C: the current image is rolled back."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated()


def _on_sigterm() -> object:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def _restore_sigterm(previous: object) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)  # type: ignore[arg-type]


def _flag(name: str) -> list[str]:
    """``--crop_strategy`` and its hyphen spelling ``--crop-strategy``."""
    hyphen = name.replace("_", "-")
    return [f"--{name}"] + ([f"--{hyphen}"] if hyphen != name else [])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _layers(text: str) -> str | list[int]:
    if text == "all":
        return text
    try:
        layers = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        layers = []
    if not layers:
        raise argparse.ArgumentTypeError(f"expected 'all' or comma-separated layer indices, got {text!r}")
    return layers


def _main_parser() -> _Parser:
    p = _Parser(
        prog="panoviz", allow_abbrev=False,
        description="Visualise what a panoramic VLM's vision encoder and resampler learned, from a checkpoint: "
                    "PCA feature maps of the views and cross-view similarity metrics.",
        epilog="Subcommand: `panoviz compare RUN_DIR_OR_JSON ... [--labels ...] [--output_dir DIR]` writes a "
               "comparison table and bar chart (see `panoviz compare --help`). Exit status: 0 success, 1 a runtime "
               "failure (e.g. an image that failed; the others are written), 2 a usage error.",
    )
    p.add_argument("--version", action="version", version=f"panoviz {__version__}")
    p.add_argument(*_flag("checkpoint"), required=True, metavar="PATH", help="a Lightning .ckpt file, or a folder "
                   "of them: each is analysed in training order and timeline.png shows the metrics over them")
    p.add_argument(*_flag("image"), nargs="+", metavar="PATH",
                   help="panoramas, folders or glob patterns; optional for checkpoints written with "
                        "PanoVizCallback (its own probe and settings are used)")
    p.add_argument(*_flag("config"), metavar="YAML", help="describes the model when the checkpoint does not "
                   "(vision_name, resampler_type, latent_dimension, crop geometry; e.g. the training config.yaml)")
    p.add_argument(*_flag("module"), metavar="PKG.MOD:CLASS", help="the LightningModule class to rebuild from the "
                   "checkpoint's hyper_parameters")
    p.add_argument(*_flag("encoder"), metavar="ATTR", help="attribute path of the vision encoder in --module "
                   "(default: found like PanoVizCallback finds it)")
    p.add_argument(*_flag("resampler"), metavar="ATTR", help="attribute path of the resampler in --module "
                   "('none': no resampler level)")
    p.add_argument(*_flag("strict"), action="store_true", help="fail when any encoder/resampler weight is "
                   "missing or unexpected")
    p.add_argument(*_flag("allow_missing_weights"), action="store_true", help="analyse a model whose encoder or "
                   "resampler weights are partly missing from the checkpoint (randomly initialised); every output "
                   "then says so (default: an error)")
    p.add_argument(*_flag("trust_checkpoint"), action="store_true", help="unpickle the checkpoint fully and import "
                   "the LightningModule class it names: this runs code stored in or named by the file; only for "
                   "files you trust (default: the checkpoint is read as data)")
    p.add_argument(*_flag("crop_strategy"), choices=_STRATEGIES, help="default: the checkpoint's or config's, else e2p")
    p.add_argument(*_flag("view_convention"), choices=("auto", "panollava", "py360"), default="auto",
                   help="how views are cut: 'panollava' as PanoLLaVA's processor cut them (its central crop, tile "
                        "render size, window origin), 'py360' the py360convert convention; auto: panollava for "
                        "PanoLLaVA checkpoints, py360 otherwise")
    p.add_argument(*_flag("fov"), type=_number, metavar="DEG", help="tile field of view in degrees (default 90)")
    p.add_argument(*_flag("overlap"), type=_number, metavar="FRAC", help="overlap of adjacent tiles in [0, 1) "
                   "(default 0.5)")
    p.add_argument(*_flag("image_size"), type=_positive_int, metavar="PX", help="view size (default: the "
                   "checkpoint's, else 224)")
    p.add_argument(*_flag("layer"), type=int, metavar="N", help="encoder hidden-state index (default -1: the last)")
    p.add_argument(*_flag("n_components"), type=_positive_int, metavar="K", help="PCA components (default 3)")
    p.add_argument(*_flag("no_cls_token"), action="store_true", help="keep the prefix tokens (CLS, registers) "
                   "in the encoder level (default: dropped)")
    p.add_argument(*_flag("bg_removal"), choices=_BG_MODES, help="PCA background handling (default threshold)")
    p.add_argument(*_flag("bg_threshold"), type=_number, metavar="T", help="threshold in [0, 1] on the robustly "
                   "scaled first component (bg_removal threshold; default 0.5; used only when it is bimodal)")
    p.add_argument(*_flag("no_similarity"), action="store_true", help="skip the metrics (figures only)")
    p.add_argument(*_flag("attention"), action="store_true", help="query attention maps of a QFormer/Perceiver "
                   "resampler and the encoder's CLS/probe attention, on the views and the sphere")
    p.add_argument(*_flag("layers"), type=_layers, metavar="all|I,J,..", help="layer sweep: overlap metrics of "
                   "these encoder hidden states (and every resampler layer), from one forward")
    p.add_argument(*_flag("agreement"), action="store_true", help="agreement panorama: per-token overlap cosine "
                   "of adjacent views painted on the sphere")
    p.add_argument(*_flag("device"), choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA when available, else the CPU")
    p.add_argument(*_flag("output_dir"), metavar="DIR", help="default: results/trained_viz/{run}-{checkpoint stem}, "
                   "the run being the nearest folder above the checkpoint that is not generic (checkpoints, "
                   "lightning_logs, version_N, ...)")
    p.add_argument(*_flag("debug"), action="store_true", help="print full tracebacks")
    return p


def _compare_parser() -> _Parser:
    p = _Parser(prog="panoviz compare", allow_abbrev=False,
                description="Compare the similarity_*.json reports of several runs: writes comparison.md and "
                            "comparison.png and prints the table.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_JSON", help="runner output folders or similarity_*.json")
    p.add_argument(*_flag("labels"), nargs="+", metavar="LABEL", help="names of the runs (default: folder names)")
    p.add_argument(*_flag("output_dir"), metavar="DIR", help="where the files go (default: the folder that holds "
                   "the runs given)")
    p.add_argument(*_flag("debug"), action="store_true", help="print full tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``panoviz`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    compare = bool(argv) and argv[0] == "compare"
    parser = _compare_parser() if compare else _main_parser()
    debug = "--debug" in argv
    previous = _on_sigterm()
    try:
        args = parser.parse_args(argv[1:] if compare else argv)
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return _compare(args) if compare else _run(args)
    except _UsageExit as exc:
        if exc.message:
            _err(f"error: {exc.message}")
        return exc.code
    except _Terminated:
        _err("terminated")
        return 143
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line and an exit status
        if debug:
            traceback.print_exc()
        _err(f"error: {_one_line(exc)}")
        return 2 if _is_usage(exc) else 1
    finally:
        _restore_sigterm(previous)


def _is_usage(exc: BaseException) -> bool:
    from panoviz_callback.checkpoint import CheckpointError, ModelSpecError
    from panoviz_callback.runner import UsageError

    return isinstance(exc, UsageError | CheckpointError | ModelSpecError)


def _run(args: argparse.Namespace) -> int:
    from panoviz_callback import checkpoint as ck
    from panoviz_callback import runner as rn
    from panoviz_callback import vision_stage as vs

    if Path(args.checkpoint).is_dir():
        return _run_folder(args)
    sources = rn.resolve_images(args.image) if args.image else None
    name = ck.checkpoint_name(args.checkpoint)
    output_dir = Path(args.output_dir) if args.output_dir else _DEFAULT_ROOT / ck.run_name(args.checkpoint)
    rn.check_output_dir(output_dir)

    ckpt = ck.read_checkpoint(args.checkpoint, _err, trust=args.trust_checkpoint)
    config = ck.load_config(args.config) if args.config else None
    spec = vs.describe_model(ckpt, config=config, module=args.module, encoder=args.encoder, resampler=args.resampler,
                             config_name=f"--config {args.config}" if args.config else "--config",
                             trust=args.trust_checkpoint)
    if spec.kind == "panollava" and args.view_convention == "py360":
        spec.geometry = dict(spec.hparams.get("py360_geometry") or {})
    elif args.view_convention == "panollava" and spec.kind != "panollava":
        raise rn.UsageError("--view_convention panollava applies to PanoLLaVA checkpoints only")
    options = {"crop_strategy": args.crop_strategy, "fov": args.fov, "overlap": args.overlap,
               "image_size": args.image_size, "layer": args.layer, "n_components": args.n_components,
               "keep_cls_token": True if args.no_cls_token else None, "bg_removal": args.bg_removal,
               "bg_threshold": args.bg_threshold, "no_similarity": args.no_similarity,
               "inside": {k: v for k, v in (("attention", args.attention), ("layers", args.layers),
                                            ("agreement", args.agreement)) if v}}
    plan = rn.plan_run(options, spec.callback, spec.geometry)
    if sources is None:
        sources = [rn.callback_probe(spec.callback)]
    device = rn.resolve_device(args.device, _err)

    model = vs.build_model(spec, ckpt, strict=args.strict, device=device, log=_err,
                           allow_missing=args.allow_missing_weights)
    epoch = ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None
    del ckpt
    resampler = "no resampler" if model.resampler is None else type(model.resampler).__name__
    print(f"Checkpoint {args.checkpoint}: {spec.source}, {type(model.encoder).__name__} + {resampler}"
          + (f", step {spec.global_step}" if spec.global_step is not None else "") + f", on {device}")
    convention = spec.geometry.get("convention") if spec.callback is None else None
    print(f"Views: {plan.crop_strategy}, {plan.image_size} px" + (f", {convention} convention" if convention else "")
          + (f", {plan.crop_options}" if plan.crop_options else ""))

    runner = rn.Runner(model.encoder, model.resampler, plan, name=name, output_dir=output_dir,
                       checkpoint=Path(args.checkpoint).absolute(), log=_err, debug=args.debug,
                       warnings=model.report.warnings, step=spec.global_step, epoch=epoch)
    results = runner.run(sources)
    print(rn.format_summary(results))
    for warning in model.report.warnings:
        _err(f"warning: {warning}")
    history = (spec.callback or {}).get("history") or []
    if history and any(r.error is None for r in results):
        from panoviz_callback.timeline import write_timeline

        path = write_timeline(history, output_dir / f"timeline_{name}.png")
        print(f"Metric timeline of the {len(history)} live firing(s) in the checkpoint: {path}")
    probe = [r for r in results if r.source.spec is not None and r.error is None]
    if probe and plan.reproduces:
        agreement = rn.live_agreement(probe[0].scalars or {}, spec.callback, spec.global_step)
        if agreement is not None:
            count, diff = agreement
            if diff <= _AGREEMENT_TOL:
                print(f"Live analysis at step {spec.global_step}: {count} values reproduced, max |difference| "
                      f"{diff:.2e}")
            else:
                _err(f"warning: the metrics differ from those logged live at step {spec.global_step} by up to "
                     f"{diff:.2e} (another device or library version?)")
    return 0 if all(r.error is None for r in results) else 1


def _run_folder(args: argparse.Namespace) -> int:
    """``--checkpoint FOLDER``: every checkpoint in training order, then the timeline (and GIFs) over them."""
    from panoviz_callback import timeline
    from panoviz_callback.report import load_similarity_json
    from panoviz_callback.runner import UsageError

    folder = Path(args.checkpoint)
    try:
        checkpoints = timeline.checkpoint_series(folder)
    except ValueError as err:
        raise UsageError(str(err)) from None
    root = Path(args.output_dir) if args.output_dir else _DEFAULT_ROOT / (folder.resolve().parent.name or "run")
    print(f"{len(checkpoints)} checkpoint(s) in {folder}: {', '.join(c.name for c in checkpoints)}")
    status, reports, usage_errors = 0, [], 0
    for path in checkpoints:
        sub = argparse.Namespace(**{**vars(args), "checkpoint": str(path), "output_dir": str(root / path.stem)})
        try:
            status = max(status, _run(sub))
        except Exception as exc:  # noqa: BLE001 - one unreadable checkpoint must not stop the series
            if args.debug:
                traceback.print_exc()
            _err(f"error: {path.name}: {_one_line(exc)} (skipped)")
            status, usage_errors = 1, usage_errors + _is_usage(exc)
            continue
        found = sorted((root / path.stem).rglob("similarity_*.json"))
        reports += [(path, load_similarity_json(f)) for f in found[:1]]
    if usage_errors == len(checkpoints):
        return 2  # nothing could be analysed
    if len(reports) >= 1:
        history = timeline.history_from_reports([data for _, data in reports])
        out = timeline.write_timeline(history, root / "timeline.png",
                                      title=f"panoviz metrics over {len(history)} checkpoint(s) of {folder}")
        print(f"Metric timeline over the checkpoints: {out}")
        for stem in ("vision_encoder_pca", "resampled_features_pca"):
            frames = [f for p, _ in reports for f in sorted((root / p.stem).glob(f"{stem}_*.png"))[:1]]
            gif = timeline.write_gif(frames, root / f"{stem}_evolution.gif")
            if gif is not None:
                print(f"Animation of {stem} over the checkpoints: {gif}")
    return status


def _compare(args: argparse.Namespace) -> int:
    from panoviz_callback import compare as cmp
    from panoviz_callback.runner import UsageError, check_output_dir

    if args.labels is not None and len(args.labels) != len(args.runs):
        raise UsageError(f"--labels names {len(args.labels)} run(s) but {len(args.runs)} were given")
    missing = [run for run in args.runs if not Path(run).exists()]
    if missing:
        raise UsageError(f"no such file or folder: {', '.join(missing)}")
    output_dir = Path(args.output_dir) if args.output_dir else _beside(args.runs)
    check_output_dir(output_dir)
    labels = args.labels or [None] * len(args.runs)
    runs = [cmp.load_run(run, label) for run, label in zip(args.runs, labels)]
    md_path, png_path = cmp.write_comparison(runs, output_dir)
    print(cmp.format_table(runs), end="")
    for message in cmp.setting_differences(runs):
        _err(f"warning: {message}")
    print(f"Wrote {md_path} (the full table) and {png_path}")
    return 0


def _beside(runs: list[str]) -> Path:
    """The folder that holds the compared runs (a run folder's parent, a JSON file's run folder's parent)."""
    import os

    folders = [Path(os.path.abspath(r)) for r in runs]
    parents = [(f.parent if f.is_dir() else f.parent.parent) for f in folders]
    return Path(os.path.commonpath([str(p) for p in parents]))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _show_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
    _err(f"warning: {_one_line(message) if isinstance(message, BaseException) else ' '.join(str(message).split())}")


def _err(message: str) -> None:
    print(f"panoviz: {message}", file=sys.stderr)
