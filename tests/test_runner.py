"""Tests of panoviz_callback.runner: live/offline agreement, many images with one model, failures, planning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import _tiny_module as tiny
from panoviz_callback import report as report_module
from panoviz_callback.checkpoint import checkpoint_name
from panoviz_callback.cli import main
from panoviz_callback.models.data import IMAGE_SUFFIXES
from panoviz_callback.runner import (
    IMAGE_SUFFIXES as RUNNER_SUFFIXES,
    ImageResult,
    ImageSource,
    Runner,
    UsageError,
    callback_probe,
    check_output_dir,
    format_summary,
    plan_run,
    resolve_images,
)

_FILES = ("original_views_{}.png", "vision_encoder_pca_{}.png", "resampled_features_pca_{}.png",
          "similarity_analysis_{}.txt", "similarity_{}.json")
_NO_FLAGS = dict.fromkeys(("crop_strategy", "fov", "overlap", "image_size", "layer", "n_components",
                           "keep_cls_token", "bg_removal", "bg_threshold", "no_similarity"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return tiny.trained_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return tiny.module_checkpoint(tmp_path_factory.mktemp("vlm") / "vlm_run" / "last.ckpt")[0]


@pytest.fixture(scope="module")
def panoramas(tmp_path_factory):
    root = tmp_path_factory.mktemp("panos")
    return [tiny.write_panorama(root / f"room{i}.png", seed=i) for i in range(3)]


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _means(json_path: Path) -> dict[str, float]:
    data = json.loads(json_path.read_text())
    means = {f"{level}/{metric}": value["mean"] for level, body in data["levels"].items()
             for metric, value in body["metrics"].items() if "mean" in value}
    for level, body in data["levels"].items():  # the PCA's masked share is logged too
        means[f"{level}/masked_share"] = sum(body["masked_share"]) / len(body["masked_share"])
    return means


# ---------------------------------------------------------------------------------------------- live == offline
@pytest.mark.parametrize("which", ["first", "last"])
def test_live_and_offline_agree(trained, tmp_path, capsys, which):
    ckpt_path = getattr(trained, which)
    out = tmp_path / "out"
    assert main(["--checkpoint", str(ckpt_path), "--output_dir", str(out)]) == 0
    name = "probe"  # files are named after the image: the callback's synthetic probe
    # the checkpoint holds the callback's history: the runner also writes the metric timeline
    assert _files(out) == sorted([f.format(name) for f in _FILES] + [f"timeline_{checkpoint_name(ckpt_path)}.png"])
    data = json.loads((out / f"similarity_{name}.json").read_text())
    assert data["image"] == str(trained.probe.resolve()) and data["checkpoint"] == str(ckpt_path.absolute())
    saved = torch.load(ckpt_path, weights_only=True)
    assert (data["step"], data["epoch"]) == (saved["global_step"], saved["epoch"])
    assert data["settings"]["crop_strategy"] == "e2p" and data["settings"]["image_size"] == tiny.SIZE
    assert data["settings"]["bg_removal"] == "threshold" and data["settings"]["n_components"] == 3
    assert data["probe"] == str(trained.probe.resolve()) and data["panoviz_version"]

    step = saved["global_step"]
    events = EventAccumulator(str(trained.tb_dir), size_guidance={"scalars": 0})
    events.Reload()
    logged = {}
    for tag in events.Tags()["scalars"]:
        if tag.startswith("panoviz/"):
            values = [e.value for e in events.Scalars(tag) if e.step == step]
            assert len(values) == 1, tag
            logged[tag.removeprefix("panoviz/")] = values[0]
    offline = _means(out / f"similarity_{name}.json")
    assert set(offline) == set(logged) and "resampled/ssim" in offline and "resampled/overlap_cosine" in offline
    for key, value in logged.items():
        assert offline[key] == pytest.approx(value, abs=1e-5), key
    stdout = capsys.readouterr().out
    assert f"Live analysis at step {step}: {len(logged)} values reproduced" in stdout
    assert "Mean metrics:" in stdout and "overlap_cosine" in stdout


def test_checkpoint_folder_runs_each_in_order_and_writes_the_timeline(trained, tmp_path, capsys):
    out = tmp_path / "series"
    assert main(["--checkpoint", str(trained.last.parent), "--output_dir", str(out), "--no_similarity"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[0].startswith("3 checkpoint(s)") and "last.ckpt" in stdout.splitlines()[0]
    order = [line.split()[1].rstrip(":") for line in stdout.splitlines() if line.startswith("Checkpoint ")]
    assert [Path(p).name for p in order] == ["epoch=0-step=1.ckpt", "epoch=1-step=2.ckpt", "last.ckpt"]
    assert (out / "timeline.png").is_file() and (out / "resampled_features_pca_evolution.gif").is_file()
    for path in trained.last.parent.glob("*.ckpt"):
        assert len(list((out / path.stem).glob("similarity_*.json"))) == 1, path


def test_runner_path_imports_no_lightning(trained, panoramas, tmp_path):
    code = ("import sys; from panoviz_callback.cli import main; "
            f"code = main(['--checkpoint', {str(trained.last)!r}, '--image', {str(panoramas[0])!r}, "
            f"'--output_dir', {str(tmp_path / 'out')!r}, '--device', 'cpu']); "
            "assert code == 0, code; "
            "loaded = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]; "
            "assert not loaded, loaded[:5]")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / f"similarity_{panoramas[0].stem}.json").is_file()


def test_callback_settings_apply_to_other_images(trained, panoramas, tmp_path):
    out = tmp_path / "out"
    assert main(["--checkpoint", str(trained.last), "--image", str(panoramas[0]), "--output_dir", str(out)]) == 0
    data = json.loads((out / f"similarity_{panoramas[0].stem}.json").read_text())
    assert data["crop_strategy"] == "e2p" and len(data["views"]) == 8 and data["image"] == str(panoramas[0])
    # the probe given as --image: colours aligned to the saved state (not frozen), the same feature metrics
    assert main(["--checkpoint", str(trained.last), "--image", str(trained.probe), "--output_dir",
                 str(tmp_path / "again")]) == 0
    again = _means(tmp_path / "again" / f"similarity_{trained.probe.stem}.json")
    live = torch.load(trained.last, weights_only=True)
    live = next(v for k, v in live["callbacks"].items() if k.startswith("PanoVizCallback"))["history"][-1]["scalars"]
    for key in ("vision_encoder/token_cosine", "resampled/overlap_cosine", "resampled/linear_cka"):
        assert again[key] == pytest.approx(live[key], abs=1e-5)


# ---------------------------------------------------------------------------------------------- many images
def test_many_images_one_model(vlm, panoramas, tmp_path, capsys):
    tiny.TinyVLM.constructions = 0
    out = tmp_path / "out"
    code = main(["--checkpoint", str(vlm), "--module", "_tiny_module:TinyVLM", "--image", str(panoramas[0].parent),
                 "--output_dir", str(out), "--crop_strategy", "e2p", "--image_size", "64"])
    assert code == 0 and tiny.TinyVLM.constructions == 1
    assert _files(out) == ["room0", "room1", "room2"]
    for stem in ("room0", "room1", "room2"):
        assert _files(out / stem) == sorted(f.format(stem) for f in _FILES)
    stdout = capsys.readouterr().out
    assert "Wrote 15 files for 3 image(s)" in stdout and "Mean metrics over 3 images:" in stdout
    # one invocation per image gives the same numbers: every image starts from the same PCA state
    single = tmp_path / "single"
    assert main(["--checkpoint", str(vlm), "--module", "_tiny_module:TinyVLM", "--image", str(panoramas[2]),
                 "--output_dir", str(single), "--image_size", "64"]) == 0
    assert _means(single / "similarity_room2.json") == _means(out / "room2" / "similarity_room2.json")


def test_bad_image_among_good_ones(vlm, panoramas, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(panoramas[0].read_bytes()[:200])
    tiny_png = tiny.write_panorama(tmp_path / "small.png", height=8)
    out = tmp_path / "out"
    code = main(["--checkpoint", str(vlm), "--module", "_tiny_module:TinyVLM", "--image", str(panoramas[0]),
                 str(broken), str(tiny_png), str(panoramas[1]), "--output_dir", str(out), "--image_size", "64",
                 "--no_similarity"])
    assert code == 1
    folder = panoramas[0].parent.name  # names are relative to the common folder of all inputs
    assert _files(out) == [f"{folder}_room0", f"{folder}_room1"]  # nothing at all for the failed images
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 2
    assert "broken.png" in errors[0] and "Cannot load panorama" in errors[0] and errors[0].endswith("(skipped)")
    assert "small.png: the image is too small (16x8 px); a panorama must be at least 64x32 px" in errors[1]


def test_failing_write_leaves_nothing(vlm, panoramas, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report_module, "write_reports", broken)
    out = tmp_path / "out"
    code = main(["--checkpoint", str(vlm), "--module", "_tiny_module:TinyVLM", "--image", str(panoramas[0]),
                 "--output_dir", str(out), "--image_size", "64", "--no_similarity"])
    assert code == 1 and not out.exists()  # the figures written before the failure are gone too


# ---------------------------------------------------------------------------------------------- inputs
def test_resolve_images(panoramas, tmp_path):
    folder = panoramas[0].parent
    (folder / "notes.txt").write_text("x")
    sources = resolve_images([str(folder), str(panoramas[1]), str(folder / "room*.png")])
    assert [s.stem for s in sources] == ["room0", "room1", "room2"]  # repeats dropped, non-images skipped
    other = tiny.write_panorama(tmp_path / "b" / "room0.png")
    common = os.path.commonpath([str(panoramas[0].parent), str(other.parent)])
    names = ["_".join(Path(os.path.relpath(p, common)).with_suffix("").parts) for p in (panoramas[0], other)]
    assert [s.stem for s in resolve_images([str(panoramas[0]), str(other)])] == names
    assert names[0] != names[1] and names[1].endswith("b_room0")
    assert RUNNER_SUFFIXES is IMAGE_SUFFIXES
    with pytest.raises(UsageError, match=r"--image '.*nope.png' does not exist"):
        resolve_images([str(tmp_path / "nope.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"--image folder '.*empty' holds no images \(.jpg, .jpeg"):
        resolve_images([str(tmp_path / "empty")])
    with pytest.raises(UsageError, match=r"--image pattern '.*\*.jpg' matches no images"):
        resolve_images([str(tmp_path / "*.jpg")])


def test_callback_probe_kinds(panoramas, tmp_path):
    synthetic = callback_probe({"probe": {"kind": "synthetic", "height": 32, "seed": 1}})
    assert synthetic.spec["kind"] == "synthetic" and synthetic.recorded is None
    path = callback_probe({"probe": {"kind": "path", "path": str(panoramas[1]), "max_width": 2048}})
    assert path.stem == "room1" and path.recorded == str(panoramas[1])
    with pytest.raises(UsageError, match=r"the callback's probe '.*moved.png' no longer exists; pass --image PATH"):
        callback_probe({"probe": {"kind": "path", "path": str(tmp_path / "moved.png"), "max_width": 2048}})
    with pytest.raises(UsageError, match=r"no --image given and the checkpoint holds no PanoVizCallback probe"):
        callback_probe(None)


def test_synthetic_and_tensor_probes_are_loaded(tmp_path):
    runner = Runner(lambda x: x, None, plan_run(_NO_FLAGS, None), name="n", output_dir=tmp_path)
    pano = runner._load(ImageSource("p", "p", spec={"kind": "synthetic", "height": 32, "seed": 1}))
    assert pano.shape == (3, 32, 64)
    pixels = (pano * 255).round().to(torch.uint8)
    torch.testing.assert_close(runner._load(ImageSource("t", "t", spec={"kind": "tensor", "pixels": pixels})),
                               pixels.float() / 255)


def test_check_output_dir(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UsageError, match=r"--output_dir '.*file.txt/out' cannot be created: '.*file.txt' is a file"):
        check_output_dir(tmp_path / "file.txt" / "out")
    check_output_dir(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()  # nothing is created by the check


# ---------------------------------------------------------------------------------------------- planning
_SAVED = {"settings": {"crop_strategy": "anyres_e2p", "image_size": 64,
                       "crop_options": {"fov_deg": 90.0, "overlap": 0.5, "num_views": 8, "pitches": [0.0],
                                        "patch_size": 16},
                       "layer": -1, "keep_cls_token": False, "n_components": 3, "bg_removal": "threshold",
                       "bg_threshold": 0.5, "metrics": ["token_cosine"], "normalize": "auto"},
          "pca_states": {"vision_encoder": {"mean": torch.zeros(4)}}}


def test_plan_reproduces_callback_settings():
    plan = plan_run(_NO_FLAGS, _SAVED)
    assert (plan.crop_strategy, plan.image_size) == ("anyres_e2p", 64)
    assert plan.crop_options == _SAVED["settings"]["crop_options"]
    assert plan.analysis["metrics"] == ["token_cosine"] and plan.reproduces and plan.freeze_probe
    assert set(plan.pca_states) == {"vision_encoder"}


def test_plan_flags_override():
    plan = plan_run({**_NO_FLAGS, "fov": 120, "n_components": 2}, _SAVED)
    assert plan.crop_options["fov_deg"] == 120.0 and "num_views" not in plan.crop_options  # derived again
    assert plan.pca_states == {} and not plan.reproduces and not plan.freeze_probe  # other PCA settings
    plan = plan_run({**_NO_FLAGS, "crop_strategy": "cubemap", "no_similarity": True}, _SAVED)
    assert plan.crop_options == {"patch_size": 16} and plan.analysis["metrics"] == ()
    assert plan.pca_states and not plan.freeze_probe  # same PCA settings: colours aligned, not frozen


def test_plan_geometry_without_callback():
    geometry = {"crop_strategy": "sliding_window", "image_size": 96, "crop_options": {"fov_deg": 80, "pitches": [0]}}
    plan = plan_run(_NO_FLAGS, None, geometry)
    assert (plan.crop_strategy, plan.image_size, plan.crop_options) == ("sliding_window", 96, {"fov_deg": 80})
    assert plan_run(_NO_FLAGS, None).crop_strategy == "e2p" and plan_run(_NO_FLAGS, None).image_size == 224


def test_plan_panollava_view_settings():
    from panoviz_callback.panollava.views import panollava_view_settings

    s = panollava_view_settings({"crop_strategy": "e2p", "image_size": 64}, "dc64bc5")
    geometry = {"crop_strategy": s["strategy"], "image_size": s["image_size"], "crop_options": s["options"]}
    assert plan_run(_NO_FLAGS, None, geometry).crop_options == s["options"]  # PanoLLaVA's views kept as they are
    plan = plan_run({**_NO_FLAGS, "fov": 120}, None, geometry)  # its yaws came from fov and overlap
    assert "yaws" not in plan.crop_options and plan.crop_options["central_crop_ratio"] == 0.9


@pytest.mark.parametrize(("flags", "match"), [
    ({"crop_strategy": "cubemap", "fov": 100}, r"--fov does not apply to --crop_strategy cubemap"),
    ({"overlap": 1.5}, r"invalid crop settings .*Argument `overlap` must be in \[0, 1\)"),
    ({"image_size": 8}, r"invalid crop settings .*Argument `image_size` must be in \[16, inf\]"),
])
def test_plan_exceptions(flags, match):
    with pytest.raises(UsageError, match=match):
        plan_run({**_NO_FLAGS, **flags}, None)


def test_format_summary(tmp_path):
    ok = ImageResult(ImageSource("a.png", "a"), tmp_path / "a", files={"json": tmp_path / "a" / "x.json"},
                     scalars={"vision_encoder/token_cosine": 0.5, "resampled/token_cosine": 0.25},
                     skipped={"vision_encoder/lpips": "weights missing", "resampled/lpips": "weights missing",
                              "vision_encoder/ssim": "no overlap", "resampled/ssim": "query tokens"})
    ok2 = ImageResult(ImageSource("b.png", "b"), tmp_path / "b", files={"json": tmp_path / "b" / "x.json"},
                      scalars={"vision_encoder/token_cosine": 0.7})
    bad = ImageResult(ImageSource("c.png", "c"), tmp_path / "c", error="broken")
    text = format_summary([ok, ok2, bad])
    assert f"Wrote 2 files for 2 image(s) to {tmp_path} (one folder per image)" in text
    assert "1 of 3 image(s) failed: c.png" in text
    # each skip reason once, per level, with that level's reason
    skipped = [line for line in text.splitlines() if line.startswith("Skipped")]
    assert skipped == ["Skipped lpips (vision_encoder, resampled): weights missing",
                       "Skipped ssim (vision_encoder): no overlap", "Skipped ssim (resampled): query tokens"]
    row = next(line for line in text.splitlines() if line.strip().startswith("token_cosine"))
    assert row.split()[1:] == ["0.6000", "0.2500"]
