"""Tests of panoviz_callback.vision_stage: rebuilding only the encoder and resampler of a checkpoint."""

from __future__ import annotations

import pytest
import torch

import _tiny_module as tiny
from panoviz_callback.checkpoint import (
    ModelSpecError,
    WeightsError,
    read_checkpoint,
)
from panoviz_callback.features import extract_features
from panoviz_callback.vision_stage import build_model, describe_model

_PIXELS = torch.rand(2, 3, tiny.SIZE, tiny.SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.siglip_folder(tmp_path_factory.mktemp("siglip") / "siglip")


def _same_tokens(a, b):
    torch.testing.assert_close(extract_features(a, _PIXELS).tokens, extract_features(b, _PIXELS).tokens)


# ---------------------------------------------------------------------------------------------- PanoLLaVA
def test_module_kind_auto_paths(tmp_path):
    path, ref = tiny.module_checkpoint(tmp_path / "vlm" / "last.ckpt")
    ckpt = read_checkpoint(path)
    spec = describe_model(ckpt, module="_tiny_module:TinyVLM")
    assert spec.kind == "module" and spec.hparams["seed"] == 1
    model = build_model(spec, ckpt, strict=True)
    assert model.report.prefixes == {"encoder": "model.vision_tower.", "resampler": "model.mm_projector."}
    _same_tokens(model.encoder, ref.model.vision_tower)
    x = torch.randn(3, 32)
    torch.testing.assert_close(model.resampler(x), ref.model.mm_projector(x))


def test_module_kind_explicit_paths_and_config_class(tmp_path):
    path, _ = tiny.module_checkpoint(tmp_path / "last.ckpt")
    ckpt = read_checkpoint(path)
    spec = describe_model(ckpt, module="_tiny_module.TinyVLM", encoder="model.vision_tower", resampler="none")
    model = build_model(spec, ckpt)
    assert model.resampler is None and model.report.prefixes == {"encoder": "model.vision_tower."}
    config = {"model": {"class_path": "_tiny_module:TinyVLM", "init_args": {"out_dim": 16}}}
    before = tiny.TinyVLM.constructions
    with pytest.raises(ModelSpecError, match=r"--config names the class `_tiny_module:TinyVLM`; panoviz does not import "
                                             r"a module named in a file on its own: rerun with --module "
                                             r"_tiny_module:TinyVLM"):
        describe_model(ckpt, config=config)
    assert tiny.TinyVLM.constructions == before
    spec = describe_model(ckpt, config=config, trust=True)
    assert spec.kind == "module" and spec.cls is tiny.TinyVLM
    spec = describe_model(ckpt, config=config, module="_tiny_module:TinyVLM")
    assert spec.kind == "module" and spec.cls is tiny.TinyVLM
    with pytest.raises(ModelSpecError, match=r"`TinyVLM` has no module at `model.vision` \(--encoder\)"):
        build_model(describe_model(ckpt, module="_tiny_module:TinyVLM", encoder="model.vision"), ckpt)


@pytest.mark.parametrize(("module", "match"), [
    ("no_such_package.models:Net", r"--module: cannot import module 'no_such_package.models' \(ModuleNotFoundError"),
    ("_tiny_module:Missing", r"--module: module '_tiny_module' has no attribute 'Missing'"),
    ("_tiny_module:Opaque", r"--module: '_tiny_module:Opaque' is not a torch.nn.Module / LightningModule class"),
    ("not a class path", r"--module: expected a class as 'pkg.module:ClassName', got 'not a class path'"),
])
def test_module_exceptions(tmp_path, module, match):
    path, _ = tiny.module_checkpoint(tmp_path / "last.ckpt")
    with pytest.raises(ModelSpecError, match=match):
        describe_model(read_checkpoint(path), module=module)


def test_no_model_description(tmp_path):
    torch.save({"state_dict": {"backbone.w": torch.zeros(2)}, "hyper_parameters": {"lr": 0.1}}, tmp_path / "x.ckpt")
    with pytest.raises(ModelSpecError, match=r"^this checkpoint holds no model configuration; pass --config "
                                             r"path/to/config.yaml or --module pkg.mod:Class$"):
        describe_model(read_checkpoint(tmp_path / "x.ckpt"))


# ---------------------------------------------------------------------------------------------- self-describing
def test_self_describing_panoviz_checkpoint(trained):
    ckpt = read_checkpoint(trained.last)
    spec = describe_model(ckpt)
    assert spec.kind == "panoviz" and spec.cls.__name__ == "PanoVisionStage"  # its builder, without Lightning
    assert spec.prefixes == {"encoder": "vision_encoder.", "resampler": "resampler."}
    assert spec.callback["probe"] == {"kind": "path", "path": str(trained.probe.resolve()), "max_width": 2048}
    assert spec.geometry["image_size"] == tiny.SIZE
    model = build_model(spec, ckpt, strict=True)
    assert model.report.ok and not hasattr(model, "projector")
    # the module layout alone (no callback state) is recognised too
    del ckpt["callbacks"]
    spec = describe_model(ckpt)
    assert spec.kind == "panoviz" and spec.callback is None and spec.source.startswith("PanoVisionModule layout")
    assert build_model(spec, ckpt, strict=True).report.ok


def test_panoviz_checkpoint_skips_pretrained_encoder_weights(trained, monkeypatch):
    import panoviz_callback.features as features

    calls, load = [], features.load_vision_encoder
    monkeypatch.setattr(features, "load_vision_encoder", lambda *a, pretrained=True, **k: (
        calls.append(pretrained), load(*a, pretrained=pretrained, **k))[1])
    ckpt = read_checkpoint(trained.last)
    build_model(describe_model(ckpt), ckpt)
    # without encoder weights in the checkpoint the pretrained ones are kept
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("vision_encoder.")}
    with pytest.raises(WeightsError, match=r"lacks weights of the encoder .* a randomly initialised part is never"):
        build_model(describe_model(ckpt), ckpt)  # "tiny" has no pretrained weights: it would be random
    model = build_model(describe_model(ckpt), ckpt, allow_missing=True, log=lambda m: None)
    assert calls == [False, True, True] and "randomly initialised" in model.report.warnings[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return tiny.trained_checkpoint(tmp_path_factory)

