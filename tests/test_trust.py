"""The runner's trust boundary: a checkpoint is data, imports are the user's choice, outputs never collide."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import _tiny_module as tiny
from _cli_helpers import _one_error, _run
from panoviz_callback.checkpoint import ModelSpecError

_TESTS = Path(__file__).resolve().parent
_ROOT = _TESTS.parent
_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_ROOT), str(_TESTS), os.environ.get("PYTHONPATH", "")])}

# A user's LightningModule in its own file: importing it leaves a marker next to it.
_USER_MODULE = textwrap.dedent('''
    from pathlib import Path

    import torch
    from lightning.pytorch import LightningModule
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from panoviz_callback.models.resamplers import build_resampler

    (Path(__file__).parent / "IMPORTED").write_text("x")


    class UserVLM(LightningModule):
        def __init__(self):
            super().__init__()
            cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=64, patch_size=16, vision_use_head=False)
            self.vision_tower = SiglipVisionModel(cfg)
            self.projector = build_resampler("mlp", 32, 16)
            self.head = torch.nn.Linear(16, 1)

        def training_step(self, batch, batch_idx):
            return self.head(self.projector(self.vision_tower(pixel_values=batch).last_hidden_state)).mean()

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.rand(2, 3, 64, 64), batch_size=2)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)
''')


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """A user module trained one epoch with the callback; the module is then forgotten."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from panoviz_callback import PanoVizCallback

    root = tmp_path_factory.mktemp("user")
    (root / "usermod.py").write_text(_USER_MODULE)
    spec = importlib.util.spec_from_file_location("usermod", root / "usermod.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["usermod"] = mod
    try:
        spec.loader.exec_module(mod)
        torch.manual_seed(0)
        model = mod.UserVLM()
        cb = PanoVizCallback(probe=None, crop_strategy="cubemap", image_size=64, encoder="vision_tower",
                             resampler="projector", strict=True)
        Trainer(default_root_dir=root, max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                enable_model_summary=False, callbacks=[cb, ModelCheckpoint(dirpath=root / "run" / "checkpoints",
                                                                           save_last=True)]).fit(model)
    finally:
        del sys.modules["usermod"]
    (root / "IMPORTED").unlink()
    return root, root / "run" / "checkpoints" / "last.ckpt", cb


def test_user_module_rebuilt_without_its_code(user_run, tmp_path, capsys, monkeypatch):
    root, ckpt, cb = user_run
    monkeypatch.chdir(root)  # usermod.py sits in the working folder
    code, stdout, err = _run(capsys, "--checkpoint", ckpt, "--output_dir", tmp_path / "out")
    assert code == 0, err
    assert not (root / "IMPORTED").exists() and "usermod" not in sys.modules
    assert "rebuilt from the callback's description" in stdout
    # the live numbers are reproduced, so the rebuilt parts are the trained ones
    assert "values reproduced" in stdout
    data = json.loads((tmp_path / "out" / "similarity_probe.json").read_text())
    assert set(data["levels"]) == {"vision_encoder", "resampled"}


def test_recorded_class_is_not_imported_without_a_description(user_run, tmp_path, capsys, monkeypatch):
    root, ckpt, _ = user_run
    raw = torch.load(ckpt, weights_only=True)
    state = next(v for k, v in raw["callbacks"].items() if k.startswith("PanoVizCallback"))
    state["vision_stage"] = None
    path = tmp_path / "nodesc" / "last.ckpt"
    path.parent.mkdir()
    torch.save(raw, path)
    monkeypatch.chdir(root)
    code, _, err = _run(capsys, "--checkpoint", path, "--output_dir", tmp_path / "out")
    assert code == 2 and not (tmp_path / "out").exists()
    _one_error(err, "names the class `usermod:UserVLM`; panoviz does not import a module named in a file on its own: "
                    "rerun with --module usermod:UserVLM")
    assert not (root / "IMPORTED").exists() and "usermod" not in sys.modules


def test_recorded_torch_class_is_not_built(tmp_path, capsys):
    path, _ = tiny.module_checkpoint(tmp_path / "big" / "last.ckpt")
    raw = torch.load(path, weights_only=True)
    raw["callbacks"] = {"PanoVizCallback{}": {"settings": {}, "module_class": "torch.nn:Linear",
                                              "encoder_path": "weight", "resampler_path": None}}
    raw["hyper_parameters"] = {"in_features": 20000, "out_features": 20000}
    torch.save(raw, path)
    code, _, err = _run(capsys, "--checkpoint", path, "--image", tiny.write_panorama(tmp_path / "p.png"),
                        "--output_dir", tmp_path / "out")
    assert code == 2
    _one_error(err, "rerun with --module torch.nn:Linear")


def test_hostile_checkpoint_exit_2_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil" / "last.ckpt"
    path.parent.mkdir()
    torch.save({"state_dict": {"w": torch.ones(1)}, "hyper_parameters": {"x": Payload()}}, path)
    code, _, err = _run(capsys, "--checkpoint", path, "--image", tiny.write_panorama(tmp_path / "p.png"),
                        "--output_dir", tmp_path / "out")
    assert code == 2 and not marker.exists() and not (tmp_path / "out").exists()
    _one_error(err, "system at `hyper_parameters.x`, which panoviz does not run; if you trust where the file comes "
                    "from, pass --trust_checkpoint")


def test_huge_probe_is_refused_before_allocating(user_run, tmp_path, capsys, monkeypatch):
    _, ckpt, _ = user_run
    raw = torch.load(ckpt, weights_only=True)
    state = next(v for k, v in raw["callbacks"].items() if k.startswith("PanoVizCallback"))
    state["probe"] = {"kind": "synthetic", "height": 30000, "seed": 0}
    path = tmp_path / "huge" / "last.ckpt"
    path.parent.mkdir()
    torch.save(raw, path)
    import panoviz_callback.panorama as pano_module

    monkeypatch.setattr(pano_module, "synthetic_panorama", lambda *a, **k: pytest.fail("allocated the probe"))
    code, _, err = _run(capsys, "--checkpoint", path, "--output_dir", tmp_path / "out")
    assert code == 2
    _one_error(err, "the checkpoint's probe: probe height 30000 is outside the supported range [16, 8192]; "
                    "pass --image PATH")


def test_view_size_from_file_is_capped(user_run, tmp_path, capsys):
    _, ckpt, _ = user_run
    raw = torch.load(ckpt, weights_only=True)
    state = next(v for k, v in raw["callbacks"].items() if k.startswith("PanoVizCallback"))
    state["settings"]["image_size"] = 100000
    path = tmp_path / "big" / "last.ckpt"
    path.parent.mkdir()
    torch.save(raw, path)
    code, _, err = _run(capsys, "--checkpoint", path, "--output_dir", tmp_path / "out")
    assert code == 2
    _one_error(err, "view size: image_size 100000 is outside the supported range")


# ---------------------------------------------------------------------------------------------- output names
@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return tiny.module_checkpoint(tmp_path_factory.mktemp("vlm") / "vlm_run" / "last.ckpt")[0]


def test_dot_and_clashing_stems_stay_inside(vlm, tmp_path, capsys):
    src = tmp_path / "in"
    paths = [src / "a" / "x.jpg", src / "a" / "x_2.jpg", src / "b" / "x.jpg", src / "c" / "...jpg", src / "a_x.png"]
    for i, p in enumerate(paths):
        p.parent.mkdir(parents=True, exist_ok=True)
        tiny.write_panorama(tmp_path / f"tmp{i}.png", seed=i).rename(p)
    out = tmp_path / "deep" / "out"
    code, stdout, err = _run(capsys, "--checkpoint", vlm, "--module", "_tiny_module:TinyVLM", "--image",
                             *paths, "--output_dir", out, "--image_size", 64, "--no_similarity")
    assert code == 0, err
    folders = sorted(p.name for p in out.iterdir())
    assert folders == sorted(["a_x", "a_x_2", "b_x", "c_", "a_x-2"])
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["out"]  # nothing written beside it
    for folder in folders:
        files = sorted(p.name for p in (out / folder).iterdir())
        assert len(files) == 5 and all(folder in f for f in files), files
    assert "Wrote 25 files for 5 image(s)" in stdout


def test_default_output_folder_names_the_run(vlm, tmp_path, capsys, monkeypatch):
    other = tmp_path / "other_run" / "checkpoints" / "last.ckpt"
    other.parent.mkdir(parents=True)
    other.write_bytes(vlm.read_bytes())
    pano = tiny.write_panorama(tmp_path / "room.png")
    monkeypatch.chdir(tmp_path)
    for ckpt in (vlm, other):
        code, _, err = _run(capsys, "--checkpoint", ckpt, "--module", "_tiny_module:TinyVLM", "--image", pano,
                            "--image_size", 64, "--no_similarity")
        assert code == 0, err
    runs = sorted(p.name for p in (tmp_path / "results" / "trained_viz").iterdir())
    assert runs == ["other_run-last", "vlm_run-last"]


def test_compare_writes_beside_its_inputs(tmp_path, capsys, monkeypatch):
    metric = {"per_pair": [0.5], "mean": 0.5, "std": 0.0}
    data = {"image": None, "checkpoint": None, "crop_strategy": "e2p", "views": [], "pairs": [[0, 1]],
            "levels": {"vision_encoder": {"token_grid": [4, 4], "metrics": {"token_cosine": metric}}}}
    root = tmp_path / "results" / "trained_viz"
    for run in ("a-last", "b-last"):
        (root / run).mkdir(parents=True)
        (root / run / "similarity_probe.json").write_text(json.dumps(data))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, stdout, err = _run(capsys, "compare", root / "a-last", root / "b-last" / "similarity_probe.json")
    assert code == 0, err
    assert list(elsewhere.iterdir()) == []  # never silently into the current folder
    assert (root / "comparison.md").is_file() and (root / "comparison.png").is_file()
    assert str(root / "comparison.md") in stdout


def test_stale_staging_is_cleaned(vlm, tmp_path, capsys):
    out = tmp_path / "out"
    stale = out / ".panoviz-999999999-abcd"
    stale.mkdir(parents=True)
    (stale / "tmp.png").write_bytes(b"")
    code, _, err = _run(capsys, "--checkpoint", vlm, "--module", "_tiny_module:TinyVLM", "--image",
                        tiny.write_panorama(tmp_path / "room.png"), "--output_dir", out, "--image_size", 64,
                        "--no_similarity")
    assert code == 0, err
    assert not stale.exists() and "removed 1 staging folder(s) left by an interrupted run" in err
    assert not list(out.rglob(".panoviz-*"))


def test_sigterm_finishes_or_rolls_back_and_leaves_no_staging(vlm, tmp_path):
    panos = [tiny.write_panorama(tmp_path / "in" / f"room{i}.png", seed=i) for i in range(3)]
    out = tmp_path / "out"
    script = tmp_path / "slow.py"
    script.write_text(textwrap.dedent('''
        import sys, time
        import panoviz_callback.report as report
        original = report.write_reports
        def slow(*args, **kwargs):
            time.sleep(1.5)
            return original(*args, **kwargs)
        report.write_reports = slow
        from panoviz_callback.cli import main
        sys.exit(main(sys.argv[1:]))
    '''))
    args = [sys.executable, str(script), "--checkpoint", str(vlm), "--module", "_tiny_module:TinyVLM", "--image",
            *map(str, panos), "--output_dir", str(out), "--image_size", "64", "--no_similarity"]
    proc = subprocess.Popen(args, env=_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.rglob(".panoviz-*")):
        time.sleep(0.05)
    assert list(out.rglob(".panoviz-*")), "the run never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "panoviz: terminated" in err and "Traceback" not in err
    assert not list(out.rglob(".panoviz-*"))
    for folder in out.iterdir():  # every image folder that exists is complete
        assert len(list(folder.iterdir())) == 5, folder


def test_sizes_from_hyper_parameters_are_capped(tmp_path, capsys):
    from panoviz_callback.checkpoint import read_checkpoint
    from panoviz_callback.vision_stage import describe_model

    path = tmp_path / "big" / "last.ckpt"
    path.parent.mkdir()
    torch.save({"state_dict": {"vision_encoder.embeddings.patch_embedding.weight": torch.zeros(1)},
                "hyper_parameters": {"vision_name": "tiny", "latent_dimension": 10**7}}, path)
    with pytest.raises(ModelSpecError, match=r"latent_dimension\): hidden size 10000000 is outside the supported range"):
        describe_model(read_checkpoint(path))
    code, _, err = _run(capsys, "--checkpoint", path, "--image", tiny.write_panorama(tmp_path / "p.png"),
                        "--output_dir", tmp_path / "out")
    assert code == 2 and not (tmp_path / "out").exists()
    _one_error(err, "hidden size 10000000 is outside the supported range")


def test_recorded_package_class_must_be_a_model(tmp_path, capsys):
    path, _ = tiny.module_checkpoint(tmp_path / "r" / "last.ckpt")
    raw = torch.load(path, weights_only=True)
    raw["callbacks"] = {"PanoVizCallback{}": {"settings": {}, "module_class":
                                              "panoviz_callback.models.resamplers:MLPResampler",
                                              "encoder_path": "x", "resampler_path": None}}
    raw["hyper_parameters"] = {"in_dim": 10**6, "out_dim": 10**6}
    torch.save(raw, path)
    code, _, err = _run(capsys, "--checkpoint", path, "--image", tiny.write_panorama(tmp_path / "p.png"),
                        "--output_dir", tmp_path / "out")
    assert code == 2
    _one_error(err, "is not a LightningModule or vision-stage builder")
