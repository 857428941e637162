"""Tests of panoviz_callback.vision_stage: rebuilding only the encoder and resampler of a checkpoint."""

from __future__ import annotations

import pytest
import torch

import _tiny_module as tiny
from panoviz_callback.checkpoint import (
    CheckpointError,
    ModelSpecError,
    WeightsError,
    read_checkpoint,
)
from panoviz_callback.features import extract_features
from panoviz_callback.vision_stage import build_model, describe_model, load_model

_PIXELS = torch.rand(2, 3, tiny.SIZE, tiny.SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.siglip_folder(tmp_path_factory.mktemp("siglip") / "siglip")


@pytest.fixture(scope="module")
def panollava(tmp_path_factory, folder):
    return tiny.panollava_checkpoint(tmp_path_factory.mktemp("pl") / "stage_vision" / "last.ckpt", folder)


def _same_tokens(a, b):
    torch.testing.assert_close(extract_features(a, _PIXELS).tokens, extract_features(b, _PIXELS).tokens)


# ---------------------------------------------------------------------------------------------- PanoLLaVA
@pytest.mark.parametrize(("encoder_prefix", "resampler_prefix", "key_head"), [
    ("model.vision_encoder.", "model.resampler_module.resampler.", "keep"),
    ("model.vision_backbone.encoder.", "model.resampler.", "add"),
    ("model.vision_encoder.", "model.resampler.", "strip"),
])
def test_panollava_layout(tmp_path, folder, encoder_prefix, resampler_prefix, key_head):
    path, ref_encoder, ref_mlp = tiny.panollava_checkpoint(
        tmp_path / "run" / "last.ckpt", folder, encoder_prefix=encoder_prefix, resampler_prefix=resampler_prefix,
        key_head=key_head)
    ckpt = read_checkpoint(path)
    spec = describe_model(ckpt)
    assert spec.kind == "panollava" and spec.global_step == 11
    assert spec.prefixes == {"encoder": encoder_prefix, "resampler": resampler_prefix}
    assert spec.geometry == {"crop_strategy": "e2p", "image_size": tiny.SIZE,
                             "crop_options": {"fov_deg": 90.0, "overlap": 0.5}}
    model = build_model(spec, ckpt, strict=True)
    assert model.report.ok and model.report.loaded["resampler"] == 10
    assert not model.encoder.training and not any(p.requires_grad for p in model.encoder.parameters())
    _same_tokens(model.encoder, ref_encoder)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(model.resampler(x), ref_mlp(x))


def test_panollava_missing_vision_name(tmp_path, folder):
    path, _, _ = tiny.panollava_checkpoint(tmp_path / "last.ckpt", folder,
                                           hparams={"resampler_type": "mlp", "latent_dimension": 24})
    with pytest.raises(ModelSpecError, match=r"the model cannot be rebuilt: `vision_name` is in neither the "
                                             r"hyper_parameters of a PanoLLaVA checkpoint and no --config was given; "
                                             r"add `vision_name: .*` to a YAML file and pass it with --config"):
        describe_model(read_checkpoint(path))
    # the config fills the gap (nested like a training config.yaml) ...
    config = {"models": {"vision_name": str(folder), "resampler_type": "mlp"}, "data": {"image_size": 48}}
    spec = describe_model(read_checkpoint(path), config=config)
    assert spec.hparams["vision_name"] == str(folder) and spec.hparams["latent_dimension"] == 24
    assert spec.geometry["image_size"] == tiny.SIZE  # the checkpoint's datamodule comes first
    # ... and a config that misses the key says so
    with pytest.raises(ModelSpecError, match=r"`vision_name` is in neither .* nor cfg.yaml; add `vision_name"):
        describe_model(read_checkpoint(path), config={"models": {"resampler_type": "mlp"}}, config_name="cfg.yaml")


def test_panollava_latent_dimension_from_weights(tmp_path, folder):
    path, _, ref_mlp = tiny.panollava_checkpoint(tmp_path / "last.ckpt", folder, hparams={"vision_name": str(folder)})
    notes = []
    model = load_model(path, log=notes.append)
    assert model.resampler.out_dim == 24 and any("latent_dimension" in n for n in notes)


def test_panollava_frozen_encoder_not_saved(tmp_path, folder):
    path, _, ref_mlp = tiny.panollava_checkpoint(tmp_path / "last.ckpt", folder)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("model.vision_encoder.")}
    torch.save(ckpt, path)
    notes = []
    model = load_model(path, strict=True, log=notes.append)
    _same_tokens(model.encoder, tiny._siglip(0))  # the folder's pretrained weights
    assert model.report.ok and notes == [
        "note: the checkpoint holds no encoder weights under 'model.vision_encoder.'; the encoder keeps the "
        f"pretrained weights of {folder}"]
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(model.resampler(x), ref_mlp(x))


def test_panollava_uncached_hub_name(tmp_path, folder):
    path, _, _ = tiny.panollava_checkpoint(tmp_path / "last.ckpt", folder,
                                           hparams={"vision_name": "nobody/no-such-model-xyz", "latent_dimension": 24})
    with pytest.raises(ModelSpecError, match=r"cannot build the vision encoder/resampler of PanoLLaVA layout .* not in "
                                             r"the local Hugging Face cache"):
        load_model(path)


def test_mismatched_weights_report_and_strict(tmp_path, folder):
    path, ref, _ = tiny.panollava_checkpoint(tmp_path / "last.ckpt", folder)
    dropped = next(k for k in ref.state_dict() if k.endswith("post_layernorm.bias"))
    ckpt = torch.load(path, weights_only=True)
    sd = ckpt["state_dict"]
    for key in [k for k in sd if k.endswith("post_layernorm.bias")] + ["model.resampler_module.resampler.mlp.6.bias"]:
        del sd[key]
    sd["model.resampler_module.resampler.extra.weight"] = torch.zeros(2)
    torch.save(ckpt, path)
    notes = []
    model = load_model(path, log=notes.append)
    assert model.report.missing["encoder"] == [dropped]
    assert notes == [
        f"warning: encoder weights under 'model.vision_encoder.': 1 missing ({dropped})",
        "warning: resampler weights under 'model.resampler_module.resampler.': 1 missing (mlp.6.bias); 1 unexpected "
        "(model.resampler_module.resampler.extra.weight)",
    ]
    with pytest.raises(WeightsError, match=r"do not match the model \(--strict\): encoder weights .* 1 missing"):
        load_model(path, strict=True)


def test_shape_mismatch_is_an_error(tmp_path, folder):
    path, _, _ = tiny.panollava_checkpoint(tmp_path / "last.ckpt", folder)
    ckpt = torch.load(path, weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.endswith("patch_embedding.weight"))
    ckpt["state_dict"][key] = torch.zeros(8, 3, 16, 16)
    torch.save(ckpt, path)
    with pytest.raises(WeightsError, match=r"the encoder weights under 'model.vision_encoder.' do not fit the rebuilt "
                                           r"encoder: size mismatch for (vision_model.)?embeddings.patch_embedding"):
        load_model(path)


# ---------------------------------------------------------------------------------------------- --module
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
    assert spec.kind == "panoviz" and spec.cls.__name__ == "PanoVisionModule"
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
    build_model(describe_model(ckpt), ckpt)
    assert calls == [False, True]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return tiny.trained_checkpoint(tmp_path_factory)

