"""Tests of the ``panoviz`` command line: flags, the three checkpoint kinds, bad input and exit codes, compare."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import _tiny_module as tiny
from _cli_helpers import _one_error, _run
from panoviz_callback import __version__
from panoviz_callback.cli import _main_parser

_TESTS = Path(__file__).resolve().parent
_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_TESTS), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.siglip_folder(tmp_path_factory.mktemp("siglip") / "siglip")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, folder):
    return tiny.panollava_checkpoint(tmp_path_factory.mktemp("pl") / "stage_vision" / "last.ckpt", folder)[0]


@pytest.fixture(scope="module")
def pano(tmp_path_factory):
    return tiny.write_panorama(tmp_path_factory.mktemp("pano") / "room.png", seed=3)


# ---------------------------------------------------------------------------------------------- flags
def test_hyphen_and_underscore_spellings():
    parser = _main_parser()
    common = ["--checkpoint", "c.ckpt", "--image", "a.jpg", "b.jpg"]
    under = parser.parse_args(common + ["--crop_strategy", "cubemap", "--image_size", "64", "--n_components", "2",
                                        "--bg_removal", "none", "--bg_threshold", "0.3", "--no_cls_token",
                                        "--no_similarity", "--output_dir", "o", "--fov", "80", "--overlap", "0.25", "--layer", "-2"])
    hyphen = parser.parse_args(common + ["--crop-strategy", "cubemap", "--image-size", "64", "--n-components", "2",
                                         "--bg-removal", "none", "--bg-threshold", "0.3", "--no-cls-token",
                                         "--no-similarity", "--output-dir", "o", "--fov", "80", "--overlap", "0.25", "--layer", "-2"])
    assert under == hyphen
    assert under.image == ["a.jpg", "b.jpg"] and under.device == "auto" and under.layer == -2
    assert under.bg_threshold == 0.3
    defaults = parser.parse_args(["--checkpoint", "c.ckpt"])
    assert defaults.crop_strategy is None and defaults.n_components is None and not defaults.no_cls_token


def test_crop_strategy_choices_match_views():
    from panoviz_callback.cli import _STRATEGIES
    from panoviz_callback.views import STRATEGIES

    assert _STRATEGIES == STRATEGIES


def test_console_script_help_and_module_version(tmp_path):
    script = shutil.which("panoviz")
    if script is None:
        pytest.skip("the console script is not installed (pip install -e .)")
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--checkpoint" in done.stdout and "--crop_strategy" in done.stdout
    done = subprocess.run([sys.executable, "-m", "panoviz_callback", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"panoviz {__version__}"
    # exit codes reach the shell; --help and --version do not import torch
    done = subprocess.run([sys.executable, "-m", "panoviz_callback", "--checkpoint", str(tmp_path / "x.ckpt")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().endswith("x.ckpt' does not exist")
    code = ("import sys; from panoviz_callback.cli import main; assert main(['--help']) == 0; "
            "assert main(['--version']) == 0; assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------- checkpoint kinds
def test_panollava_checkpoint_with_image(ckpt, pano, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "--checkpoint", ckpt, "--image", pano, "--output_dir", out, "--device", "cpu")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f.format(Path(pano).stem) for f in ("original_views_{}.png", "vision_encoder_pca_{}.png",
                                           "resampled_features_pca_{}.png", "similarity_analysis_{}.txt",
                                           "similarity_{}.json"))
    data = json.loads((out / f"similarity_{Path(pano).stem}.json").read_text())
    assert data["crop_strategy"] == "e2p" and len(data["views"]) == 8  # geometry from datamodule_hyper_parameters
    assert data["levels"]["resampled"]["token_grid"] == [4, 4]
    assert "PanoLLaVA dc64bc5 layout (model.vision_backbone.encoder.*)" in stdout and "Mean metrics:" in stdout
    assert str(out) in stdout


def test_panollava_without_vision_name(folder, pano, tmp_path, capsys):
    path, _, _ = tiny.panollava_checkpoint(tmp_path / "run" / "last.ckpt", folder,
                                           hparams={"resampler_type": "mlp", "latent_dimension": 24})
    out = tmp_path / "out"
    code, _, err = _run(capsys, "--checkpoint", path, "--image", pano, "--output_dir", out)
    assert code == 2 and not out.exists()
    _one_error(err, "the model cannot be rebuilt: `vision_name` is in neither the hyper_parameters of a PanoLLaVA "
                    "checkpoint and no --config was given")
    config = tmp_path / "config.yaml"
    config.write_text(f"models:\n  vision_name: {folder}\n  resampler_type: mlp\n")
    code, _, err = _run(capsys, "--checkpoint", path, "--image", pano, "--output_dir", out, "--config", config,
                        "--no_similarity")
    assert code == 0, err
    assert len(list(out.iterdir())) == 5


def test_module_checkpoint_with_explicit_paths(pano, tmp_path, capsys):
    path, _ = tiny.module_checkpoint(tmp_path / "vlm" / "last.ckpt")
    code, stdout, err = _run(capsys, "--checkpoint", path, "--module", "_tiny_module:TinyVLM", "--encoder",
                             "model.vision_tower", "--resampler", "none", "--image", pano, "--image_size", 64,
                             "--output_dir", tmp_path / "out", "--no_similarity", "--strict")
    assert code == 0, err
    stem = Path(pano).stem
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"original_views_{stem}.png", f"similarity_analysis_{stem}.txt", f"similarity_{stem}.json",
        f"vision_encoder_pca_{stem}.png"]
    assert "no resampler" in stdout and "No metrics computed." in stdout


def test_device_auto_falls_back_with_a_note(ckpt, pano, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, stdout, err = _run(capsys, "--checkpoint", ckpt, "--image", pano, "--output_dir", tmp_path,
                             "--no_similarity")
    assert code == 0 and "panoviz: note: CUDA is not available; running on the CPU" in err and "on cpu" in stdout


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_checkpoint_flag(capsys):
    code, _, err = _run(capsys, "--image", "a.jpg")
    assert code == 2
    _one_error(err, "the following arguments are required: --checkpoint (see panoviz --help)")


def test_checkpoint_missing(tmp_path, capsys):
    code, _, err = _run(capsys, "--checkpoint", tmp_path / "none.ckpt", "--output_dir", tmp_path / "o")
    assert code == 2 and not (tmp_path / "o").exists()
    _one_error(err, "none.ckpt' does not exist")


def test_checkpoint_unreadable(ckpt, tmp_path, capsys):
    data = ckpt.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 3])
    code, _, err = _run(capsys, "--checkpoint", tmp_path / "cut.ckpt", "--output_dir", tmp_path / "o")
    assert code == 2
    _one_error(err, "cut.ckpt' is damaged or not a PyTorch checkpoint")
    # a folder is a series of checkpoints: each bad one is named and skipped; none readable is a usage error
    code, _, err = _run(capsys, "--checkpoint", tmp_path, "--output_dir", tmp_path / "o")
    assert code == 2
    _one_error(err, "cut.ckpt: ")
    assert "is damaged or not a PyTorch checkpoint" in err and err.rstrip().endswith("(skipped)")


def test_jpeg_as_checkpoint(tmp_path, capsys):
    Image.new("RGB", (32, 16), (200, 10, 10)).save(tmp_path / "photo.jpg")
    code, _, err = _run(capsys, "--checkpoint", tmp_path / "photo.jpg", "--output_dir", tmp_path / "o")
    assert code == 2
    _one_error(err, "photo.jpg' is not a PyTorch/Lightning checkpoint: it is a JPEG image")


def test_no_model_description(pano, tmp_path, capsys):
    torch.save({"state_dict": {"backbone.weight": torch.zeros(3)}, "hyper_parameters": {"lr": 0.1}},
               tmp_path / "x.ckpt")
    code, _, err = _run(capsys, "--checkpoint", tmp_path / "x.ckpt", "--image", pano, "--output_dir", tmp_path / "o")
    assert code == 2
    _one_error(err, "this checkpoint holds no model configuration; pass --config path/to/config.yaml or "
                    "--module pkg.mod:Class")


def test_config_invalid_yaml_and_missing_keys(ckpt, pano, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("vision_name: [a\nresampler_type: mlp\n")
    code, _, err = _run(capsys, "--checkpoint", ckpt, "--config", bad, "--image", pano, "--output_dir", tmp_path / "o")
    assert code == 2
    _one_error(err, "bad.yaml' is not valid YAML")
    torch.save({"state_dict": {"model.vision_encoder.x": torch.zeros(1)}, "hyper_parameters": {}}, tmp_path / "n.ckpt")
    partial = tmp_path / "partial.yaml"
    partial.write_text("resampler_type: mlp\nlatent_dimension: 24\n")
    code, _, err = _run(capsys, "--checkpoint", tmp_path / "n.ckpt", "--config", partial, "--image", pano,
                        "--output_dir", tmp_path / "o")
    assert code == 2
    _one_error(err, "`vision_name` is in neither the hyper_parameters of a PanoLLaVA checkpoint nor "
                    f"--config {partial}")


def test_module_not_importable(ckpt, pano, tmp_path, capsys):
    code, _, err = _run(capsys, "--checkpoint", ckpt, "--module", "missing_pkg.model:Net", "--image", pano,
                        "--output_dir", tmp_path / "o")
    assert code == 2
    _one_error(err, "--module: cannot import module 'missing_pkg.model' (ModuleNotFoundError")


def test_image_missing_and_folder_without_images(ckpt, tmp_path, capsys):
    code, _, err = _run(capsys, "--checkpoint", ckpt, "--image", tmp_path / "nope.jpg", "--output_dir", tmp_path / "o")
    assert code == 2
    _one_error(err, "nope.jpg' does not exist")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    code, _, err = _run(capsys, "--checkpoint", ckpt, "--image", tmp_path / "empty", "--output_dir", tmp_path / "o")
    assert code == 2
    _one_error(err, "empty' holds no images (.jpg, .jpeg, .png, .webp, .tif, .tiff)")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("kind", "match"), [
    ("corrupt", "Cannot load panorama"),
    ("tiny", "the image is too small (20x10 px); a panorama must be at least 64x32 px"),
])
def test_image_corrupt_or_tiny(ckpt, tmp_path, capsys, kind, match):
    image = tmp_path / "bad.jpg"
    if kind == "corrupt":
        image.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(300))
    else:
        Image.new("RGB", (20, 10), (10, 200, 10)).save(image)
    out = tmp_path / "o"
    code, _, err = _run(capsys, "--checkpoint", ckpt, "--image", image, "--output_dir", out, "--no_similarity")
    assert code == 1 and not out.exists()
    _one_error(err, match)


def test_cuda_requested_without_cuda(ckpt, pano, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = _run(capsys, "--checkpoint", ckpt, "--image", pano, "--device", "cuda", "--output_dir", tmp_path)
    assert code == 2
    _one_error(err, "--device cuda: CUDA is not available on this machine")


def test_unwritable_output_dir(ckpt, pano, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    code, _, err = _run(capsys, "--checkpoint", ckpt, "--image", pano, "--output_dir", tmp_path / "taken" / "out")
    assert code == 2
    _one_error(err, "cannot be created: '")
    assert (tmp_path / "taken").read_text() == "a file"


@pytest.mark.parametrize(("argv", "match"), [
    (["--n_components", "0"], "argument --n_components/--n-components: must be at least 1, got 0"),
    (["--bg_removal", "median"], "argument --bg_removal/--bg-removal: invalid choice: 'median'"),
    (["--crop_strategy", "cube"], "argument --crop_strategy/--crop-strategy: invalid choice: 'cube'"),
    (["--image_size", "abc"], "argument --image_size/--image-size: expected a whole number, got 'abc'"),
    (["--overlap", "1.5"], "Argument `overlap` must be in [0, 1)"),
    (["--bg_threshold", "1.5"], "Argument `bg_threshold` must be in [0, 1]"),
    (["--crop_strategy", "cubemap", "--fov", "100"], "--fov does not apply to --crop_strategy cubemap"),
])
def test_bad_option_values(ckpt, pano, tmp_path, capsys, argv, match):
    code, _, err = _run(capsys, "--checkpoint", ckpt, "--image", pano, "--output_dir", tmp_path / "o", *argv)
    assert code == 2 and not (tmp_path / "o").exists()
    _one_error(err, match)


def test_debug_shows_tracebacks(tmp_path, capsys):
    code, _, err = _run(capsys, "--checkpoint", tmp_path / "none.ckpt", "--debug")
    assert code == 2 and "Traceback" in err and "CheckpointError" in err


def test_no_image_without_callback_probe(ckpt, tmp_path, capsys):
    code, _, err = _run(capsys, "--checkpoint", ckpt, "--output_dir", tmp_path / "o")
    assert code == 2
    _one_error(err, "no --image given and the checkpoint holds no PanoVizCallback probe; pass --image PATH")


# ---------------------------------------------------------------------------------------------- compare
def _report(path: Path, token_cos: float) -> Path:
    metric = {"per_pair": [token_cos], "mean": token_cos, "std": 0.0}
    data = {"image": None, "checkpoint": None, "crop_strategy": "e2p", "views": [], "pairs": [[0, 1]],
            "levels": {"vision_encoder": {"token_grid": [4, 4], "metrics": {"token_cosine": metric}}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_compare(tmp_path, capsys):
    a = _report(tmp_path / "epoch0" / "img" / "similarity_epoch0.json", 0.25).parent.parent
    b = _report(tmp_path / "similarity_last.json", 0.5)
    out = tmp_path / "cmp"
    code, stdout, err = _run(capsys, "compare", a, b, "--labels", "before", "after", "--output_dir", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["comparison.md", "comparison.png"]
    header, _, row = stdout.splitlines()[:3]  # one block per level: metrics as rows, runs as columns
    assert header.split() == ["vision_encoder", "before", "after"] and row.split() == ["token_cosine", "0.2500",
                                                                                       "0.5000"]
    md = (out / "comparison.md").read_text()
    assert "| before | 0.2500 |" in md and "| after | 0.5000 |" in md
    code, stdout, _ = _run(capsys, "compare", a, b, "--output-dir", out)
    assert code == 0 and stdout.splitlines()[0].split()[1] == "epoch0"


def test_compare_exceptions(tmp_path, capsys):
    a = _report(tmp_path / "similarity_a.json", 0.25)
    code, _, err = _run(capsys, "compare", a, a, "--labels", "x", "--output_dir", tmp_path)
    assert code == 2
    _one_error(err, "--labels names 1 run(s) but 2 were given")
    code, _, err = _run(capsys, "compare", a, tmp_path / "missing", "--output_dir", tmp_path)
    assert code == 2
    _one_error(err, "no such file or folder: ")
    (tmp_path / "similarity_bad.json").write_text("{not json")
    code, _, err = _run(capsys, "compare", a, tmp_path / "similarity_bad.json", "--output_dir", tmp_path / "c")
    assert code == 1 and not (tmp_path / "c").exists()
    _one_error(err, "not a similarity report (invalid JSON")
    code, _, err = _run(capsys, "compare", "--output_dir", tmp_path)
    assert code == 2
    _one_error(err, "the following arguments are required: RUN_DIR_OR_JSON")
