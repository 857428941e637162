"""Tests of panoviz_callback.checkpoint: reading checkpoints as data, names, caps."""

from __future__ import annotations

import zipfile

import pytest
import torch

import _tiny_module as tiny
from panoviz_callback.checkpoint import (
    LIMITS,
    CheckpointError,
    ModelSpecError,
    check_limit,
    checkpoint_name,
    load_config,
    read_checkpoint,
    run_name,
)


# ---------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize(("path", "name"), [
    ("runs/vicreg_a/last.ckpt", "vicreg_a"),
    ("exp/checkpoints/epoch=0-step=10.ckpt", "epoch=0-step=10"),
    ("exp/lightning_logs/version_3/last.ckpt", "last"),
    ("stage_finetune/model.ckpt", "stage_finetune"),
])
def test_checkpoint_name(path, name):
    assert checkpoint_name(path) == name


# ---------------------------------------------------------------------------------------------- reading
def test_read_checkpoint_exceptions(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint '.*nope.ckpt' does not exist"):
        read_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match=r"is a folder, expected a .ckpt file"):
        read_checkpoint(tmp_path)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        read_checkpoint(tmp_path / "empty.ckpt")
    (tmp_path / "photo.ckpt").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(64))
    with pytest.raises(CheckpointError, match=r"is not a PyTorch/Lightning checkpoint: it is a JPEG image"):
        read_checkpoint(tmp_path / "photo.ckpt")
    (tmp_path / "notes.ckpt").write_text("model: siglip\n")
    with pytest.raises(CheckpointError, match=r"it is a text file"):
        read_checkpoint(tmp_path / "notes.ckpt")
    with zipfile.ZipFile(tmp_path / "archive.ckpt", "w") as z:
        z.writestr("readme.txt", "not torch")
    with pytest.raises(CheckpointError, match=r"is damaged or not a PyTorch checkpoint"):
        read_checkpoint(tmp_path / "archive.ckpt")
    torch.save({"weights": {"a": torch.zeros(1)}, "step": 3}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match=r"is not a Lightning checkpoint: it holds a dict with keys "
                                              r"\['step', 'weights'\], no 'state_dict'"):
        read_checkpoint(tmp_path / "other.ckpt")


def test_read_checkpoint_truncated(tmp_path):
    path, _ = tiny.module_checkpoint(tmp_path / "full.ckpt")
    data = path.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.ckpt' is damaged or not a PyTorch checkpoint"):
        read_checkpoint(tmp_path / "cut.ckpt")


def test_read_checkpoint_bare_state_dict(tmp_path):
    torch.save({"vision_encoder.w": torch.ones(2)}, tmp_path / "sd.pt")
    assert set(read_checkpoint(tmp_path / "sd.pt")["state_dict"]) == {"vision_encoder.w"}


# ---------------------------------------------------------------------------------------------- config
def test_load_config_exceptions(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n  vision_name: x\n")
    with pytest.raises(ModelSpecError, match=r"--config '.*bad.yaml' is not valid YAML \(.* at line \d+, column \d+\)"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ModelSpecError, match=r"must hold a mapping of keys to values, got a list"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ModelSpecError, match=r"--config '.*missing.yaml' does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == {}



# ---------------------------------------------------------------------------------------------- read as data
class _System:
    """Pickles as ``os.system(command)``: what a hostile checkpoint holds."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


class _Eval:
    """Pickles as ``eval(source)``, a value that would evaluate to a number."""

    def __init__(self, source):
        self.source = source

    def __reduce__(self):
        return eval, (self.source,)


def _payloads(tmp_path):
    marker = tmp_path / "PWNED"
    touch = f"touch {marker}"
    sd = {"vision_encoder.w": torch.ones(2)}
    cases = {
        "top": _System(touch),
        "hparams": {"state_dict": sd, "hyper_parameters": {"lr": _Eval(f"__import__('os').system('{touch}') or 0.1")}},
    }
    paths = {}
    for name, obj in cases.items():
        paths[name] = tmp_path / f"{name}.ckpt"
        torch.save(obj, paths[name])
    paths["legacy"] = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": sd, "x": _System(touch)}, paths["legacy"], _use_new_zipfile_serialization=False)
    return marker, paths


@pytest.mark.parametrize("case", ["top", "hparams", "legacy"])
def test_read_checkpoint_never_runs_code(tmp_path, case):
    marker, paths = _payloads(tmp_path)
    with pytest.raises(CheckpointError, match=r"holds a call to (posix|os|nt)\.system|holds a call to builtins\.eval"):
        read_checkpoint(paths[case], lambda m: None)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="--trust_checkpoint"):
        read_checkpoint(paths[case], lambda m: None)


def test_read_checkpoint_trusted_runs_full_unpickling(tmp_path):
    marker, paths = _payloads(tmp_path)
    notes = []
    ckpt = read_checkpoint(paths["legacy"], notes.append, trust=True)
    assert marker.exists() and ckpt["x"] == 0  # the explicit opt-in really unpickles
    assert len(notes) == 1 and "runs any code" in notes[0]


def save_with_vanishing_module(obj_factory, path, module="shadow_cora_schema"):
    """Save what ``obj_factory(module)`` returns while ``module`` exists, then remove the module."""
    import sys
    import types

    mod = types.ModuleType(module)
    sys.modules[module] = mod
    try:
        torch.save(obj_factory(mod), path)
    finally:
        del sys.modules[module]


def test_read_checkpoint_unknown_classes_become_plain_data(tmp_path):
    import argparse
    import pathlib

    from pydantic import BaseModel

    def build(mod):
        class Inner(BaseModel):
            resampler_type: str = "qformer"
            resampler_config: dict = {"num_query_tokens": 16}

        class ShadowConfig(BaseModel):
            vision_name: str = "google/siglip-base-patch16-224"
            model: Inner = Inner()
            path: pathlib.Path = pathlib.Path("/data/x")

        for cls in (Inner, ShadowConfig):
            cls.__module__, cls.__qualname__ = mod.__name__, cls.__name__
            setattr(mod, cls.__name__, cls)
        return {"state_dict": {"w": torch.ones(1)},
                "hyper_parameters": {"config": ShadowConfig(), "ns": argparse.Namespace(a=1, b=[2])}}

    path = tmp_path / "cfg.ckpt"
    save_with_vanishing_module(build, path)
    notes = []
    ckpt = read_checkpoint(path, notes.append)
    assert ckpt["hyper_parameters"] == {
        "config": {"vision_name": "google/siglip-base-patch16-224",
                   "model": {"resampler_type": "qformer", "resampler_config": {"num_query_tokens": 16}},
                   "path": "/data/x"},
        "ns": {"a": 1, "b": [2]},
    }
    assert len(notes) == 1 and "shadow_cora_schema.ShadowConfig" in notes[0] and "without importing" in notes[0]


def test_read_checkpoint_plain_lightning_file_has_no_note(tmp_path):
    path, _ = tiny.module_checkpoint(tmp_path / "plain.ckpt")
    notes = []
    ckpt = read_checkpoint(path, notes.append)
    assert notes == [] and all(isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values())


def test_read_checkpoint_object_in_state_dict_is_refused(tmp_path):
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1), "x": tiny.Opaque(3)}}, path)
    with pytest.raises(CheckpointError, match=r"holds an object of class _tiny_module\.Opaque in its state_dict at `x`"):
        read_checkpoint(path, lambda m: None)


# ---------------------------------------------------------------------------------------------- names, caps
@pytest.mark.parametrize(("path", "name"), [
    ("runs/a/checkpoints/last.ckpt", "a-last"),
    ("runs/b/lightning_logs/version_2/checkpoints/epoch=1.ckpt", "b-version_2-epoch=1"),
    ("/last.ckpt", "last"),
    ("exp/.hidden/..ckpt", "hidden-"),
])
def test_run_name(path, name):
    assert run_name(path) == name


def test_check_limit():
    assert check_limit(224, "image_size", "x") == 224
    with pytest.raises(ModelSpecError, match=r"the checkpoint: image_size 30000 is outside the supported range"):
        check_limit(30000, "image_size", "the checkpoint")
    with pytest.raises(ModelSpecError, match=r"must be a number, got 'a'"):
        check_limit("a", "layer", "x")
    assert LIMITS["probe height"][1] < 30000


def test_read_checkpoint_numpy_values_are_data(tmp_path):
    import numpy as np

    path = tmp_path / "np.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)},
                "hyper_parameters": {"lr": np.float64(0.5), "size": np.int64(224), "mean": np.array([0.5, 0.25])}},
               path)
    notes = []
    h = read_checkpoint(path, notes.append)["hyper_parameters"]
    assert notes == [] and h["lr"] == 0.5 and h["size"] == 224 and list(h["mean"]) == [0.5, 0.25]
