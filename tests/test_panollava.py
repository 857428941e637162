"""PanoLLaVA checkpoints: layouts recognised from the file alone, settings read as data, outputs as computed."""

from __future__ import annotations

import sys

import pytest
import torch

import _tiny_module as tiny
from panoviz_callback.checkpoint import ModelSpecError, WeightsError, read_checkpoint
from panoviz_callback.features import extract_features
from panoviz_callback.panollava import PanoLLaVAResampler, detect_layout, read_settings
from panoviz_callback.vision_stage import describe_model, load_model, load_vision_stage

_PIXELS = torch.rand(2, 3, tiny.SIZE, tiny.SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.siglip_folder(tmp_path_factory.mktemp("siglip") / "siglip")


def _reference(ref_encoder, stage):
    with torch.no_grad():
        tokens = ref_encoder(pixel_values=(_PIXELS - 0.5) / 0.5).last_hidden_state  # SigLIP: mean/std 0.5
        return tokens, stage(tokens)


@pytest.mark.parametrize("revision", ["head", "dc64bc5", "7227614"])
@pytest.mark.parametrize("use_norm", [True, False])
@pytest.mark.parametrize("key_head", ["keep", "add"])
def test_every_layout_reproduces_the_model(tmp_path, folder, revision, use_norm, key_head):
    path, ref_encoder, stage = tiny.panollava_checkpoint(tmp_path / "run" / "last.ckpt", folder, revision=revision,
                                                         use_norm=use_norm, key_head=key_head)
    assert "cora" not in sys.modules  # the pickled CORAConfig's package does not exist here
    ckpt = read_checkpoint(path, lambda m: None)
    assert detect_layout(ckpt).revision == revision
    settings = read_settings(ckpt, detect_layout(ckpt))
    assert settings["vision_name"] == str(folder) and settings["resampler_type"] == "mlp"
    assert settings["use_vicreg_norm"] is use_norm and settings["latent_dimension"] == 24
    model = load_vision_stage(path, log=lambda m: None)
    assert model.spec.kind == "panollava" and model.report.ok
    assert model.views["strategy"] == "e2p" and model.views["image_size"] == tiny.SIZE
    assert isinstance(model.resampler, PanoLLaVAResampler)
    tokens, expected = _reference(ref_encoder, stage)
    with torch.no_grad():
        feats = extract_features(model.encoder, _PIXELS, keep_cls_token=True)
        got = model.resampler(feats.tokens)
    assert (feats.tokens - tokens).abs().max() <= 1e-5
    assert (got - expected).abs().max() <= 1e-4


def test_head_settings_come_from_the_pickled_config(tmp_path, folder):
    path, _, _ = tiny.panollava_checkpoint(tmp_path / "last.ckpt", folder, revision="head", use_norm=True)
    notes = []
    ckpt = read_checkpoint(path, notes.append)
    assert len(notes) == 1 and "cora.config.schema.CORAConfig" in notes[0]
    spec = describe_model(ckpt)
    assert spec.hparams["resampler_config"] == {"hidden_dim": 32, "depth": 3, "use_ln": True}
    assert spec.geometry["crop_strategy"] == "e2p" and spec.geometry["image_size"] == tiny.SIZE
    assert "PanoLLaVA head layout" in spec.source and "with the VICReg LayerNorm" in spec.source
    assert spec.prefixes["resampler"] == "model.resampler_module.resampler."


def test_norm_changes_the_resampled_level(tmp_path, folder):
    """The LayerNorm is applied: ignoring it gives another result (what the old reader did)."""
    path, ref_encoder, stage = tiny.panollava_checkpoint(tmp_path / "last.ckpt", folder, revision="dc64bc5")
    model = load_vision_stage(path, log=lambda m: None)
    tokens, expected = _reference(ref_encoder, stage)
    with torch.no_grad():
        without_norm = model.resampler.resampler(tokens)
    assert (without_norm - expected).abs().max() > 1e-2


def test_missing_vision_name_and_config(tmp_path, folder):
    path, _, _ = tiny.panollava_checkpoint(tmp_path / "last.ckpt", folder,
                                           hparams={"resampler_type": "mlp", "latent_dimension": 24})
    with pytest.raises(ModelSpecError, match=r"the model cannot be rebuilt: `vision_name` is in neither the "
                                             r"hyper_parameters of a PanoLLaVA checkpoint and no --config was given; "
                                             r"add `vision_name: .*` to a YAML file and pass it with --config"):
        describe_model(read_checkpoint(path))
    config = {"models": {"vision_name": str(folder), "resampler_type": "mlp"}, "data": {"image_size": 48}}
    spec = describe_model(read_checkpoint(path), config=config)
    assert spec.hparams["vision_name"] == str(folder) and spec.hparams["latent_dimension"] == 24
    assert spec.geometry["image_size"] == tiny.SIZE  # the checkpoint's datamodule comes first
    with pytest.raises(ModelSpecError, match=r"`vision_name` is in neither .* nor cfg.yaml; add `vision_name"):
        describe_model(read_checkpoint(path), config={"models": {"resampler_type": "mlp"}}, config_name="cfg.yaml")


def test_frozen_encoder_not_saved_keeps_pretrained(tmp_path, folder):
    path, _, stage = tiny.panollava_checkpoint(tmp_path / "last.ckpt", folder, revision="7227614", use_norm=False)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("model.vision_encoder.")}
    torch.save(ckpt, path)
    notes = []
    model = load_model(path, strict=True, log=notes.append)
    pretrained = tiny._siglip(0)
    tokens, expected = _reference(pretrained, stage)
    with torch.no_grad():
        torch.testing.assert_close(extract_features(model.encoder, _PIXELS).tokens, tokens)
        torch.testing.assert_close(model.resampler(tokens), expected)
    assert notes == ["note: the checkpoint holds no encoder weights under 'model.vision_encoder.'; the encoder keeps "
                     f"the pretrained weights of {folder}"]


def test_uncached_hub_name(tmp_path, folder):
    path, _, _ = tiny.panollava_checkpoint(tmp_path / "last.ckpt", folder,
                                           hparams={"vision_name": "nobody/no-such-model-xyz", "latent_dimension": 24})
    with pytest.raises(ModelSpecError, match=r"cannot build the PanoLLaVA vision encoder `nobody/no-such-model-xyz`: "
                                             r".*not in the local Hugging Face cache"):
        load_model(path)


def test_missing_weights_are_an_error(tmp_path, folder):
    path, ref, _ = tiny.panollava_checkpoint(tmp_path / "last.ckpt", folder, revision="dc64bc5")
    ckpt = torch.load(path, weights_only=True)
    sd = ckpt["state_dict"]
    del sd["model.resampler_module.resampler.mlp.6.bias"]
    torch.save(ckpt, path)
    with pytest.raises(WeightsError, match=r"lacks weights of the resampler \(.*mlp\.6\.bias.*\); a randomly "
                                           r"initialised part is never analysed \(--allow_missing_weights"):
        load_model(path, log=lambda m: None)
    del sd["model.vision_backbone.encoder.post_layernorm.bias"]
    torch.save(ckpt, path)
    with pytest.raises(WeightsError, match=r"lacks weights of the encoder and resampler"):
        load_model(path, log=lambda m: None)
    notes = []
    model = load_model(path, log=notes.append, allow_missing=True)
    assert len(model.report.warnings) == 2 and all("randomly initialised" in w for w in model.report.warnings)
    assert any("post_layernorm.bias" in n for n in notes)


def test_shape_mismatch_is_an_error(tmp_path, folder):
    path, _, _ = tiny.panollava_checkpoint(tmp_path / "last.ckpt", folder, revision="7227614")
    ckpt = torch.load(path, weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.endswith("patch_embedding.weight"))
    ckpt["state_dict"][key] = torch.zeros(8, 3, 16, 16)
    torch.save(ckpt, path)
    with pytest.raises(WeightsError, match=r"the encoder weights under 'model.vision_encoder.' do not fit the rebuilt "
                                           r"encoder: size mismatch for (vision_model.)?embeddings.patch_embedding"):
        load_model(path, log=lambda m: None)


def test_allow_missing_weights_is_said_in_every_report(tmp_path, folder, capsys):
    import json

    from panoviz_callback.cli import main

    path, _, _ = tiny.panollava_checkpoint(tmp_path / "run" / "last.ckpt", folder, revision="7227614")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["state_dict"]["model.resampler.mlp.6.bias"]
    torch.save(ckpt, path)
    pano = tiny.write_panorama(tmp_path / "room.png")
    out = tmp_path / "out"
    assert main(["--checkpoint", str(path), "--image", str(pano), "--output_dir", str(out), "--no_similarity"]) == 1
    assert not out.exists()
    assert main(["--checkpoint", str(path), "--image", str(pano), "--output_dir", str(out), "--no_similarity",
                 "--allow_missing_weights"]) == 0
    data = json.loads((out / "similarity_room.json").read_text())
    assert len(data["warnings"]) == 1 and "mlp.6.bias" in data["warnings"][0]
    assert (out / "similarity_analysis_room.txt").read_text().splitlines()[2].startswith("WARNING: weights missing")
    assert "randomly initialised" in capsys.readouterr().err


_TINY_CONFIGS = {
    "mlp": {"hidden_dim": 32, "depth": 2},
    "qformer": {"num_query_tokens": 4, "num_hidden_layers": 1, "num_attention_heads": 2},
    "perceiver": {"num_latents": 4, "heads": 2, "depth": 1},
    "spatial_pool": {"pool_size": 2, "depth": 1},
    "masked_drop": {"mask_ratio": 0.5, "depth": 1},
    "c_abstractor": {"hidden_dim": 32, "depth": 1, "num_queries": 0, "kernel_size": 3, "expand": 1,
                     "se_reduction": 4, "mlp_depth": 1},
    "bimamba": {"hidden_dim": 16, "num_layers": 1, "d_state": 4, "d_conv": 2, "expand": 1.0},
    "identity": {}, "avg": {}, "conv": {},
}


def _type_cases():
    from panoviz_callback.panollava.resamplers import RESAMPLER_TYPES

    return [(rev, rtype) for rev, types in RESAMPLER_TYPES.items() for rtype in types if rtype in _TINY_CONFIGS]


@pytest.mark.parametrize(("revision", "rtype"), _type_cases())
def test_every_resampler_type_through_the_checkpoint(tmp_path, folder, revision, rtype):
    """Checkpoint -> layout, settings (CORAConfig at head), norm and resampler -> PanoLLaVA's forward."""
    from panoviz_callback.panollava.resamplers import build_panollava_resampler

    torch.manual_seed(3)
    config = _TINY_CONFIGS[rtype]
    ref = build_panollava_resampler(rtype, vision_dim=32, latent_dim=24, config=config, revision=revision)
    with torch.no_grad():
        for param in ref.parameters():
            param.add_(0.05 * torch.randn_like(param))
    path, ref_encoder, _ = tiny.panollava_checkpoint(
        tmp_path / "last.ckpt", folder, revision=revision, use_norm=True,
        hparams=({"resampler_type": rtype, "resampler_config": config} if revision == "head" else
                 {"vision_name": str(folder), "resampler_type": rtype, "latent_dimension": 24,
                  "resampler_config": config}))
    from panoviz_callback.safeload import safe_torch_load

    ckpt = safe_torch_load(path)  # swap the fixture's MLP weights for this resampler's
    prefix = tiny.PANOLLAVA_PREFIXES[revision][2]
    sd = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(prefix) and "resampler." not in k}
    sd.update({f"{prefix}{k}": v for k, v in ref.state_dict().items()})
    ckpt["state_dict"] = sd
    if revision == "head":  # the CORAConfig, as the plain data it is read as
        ckpt["hyper_parameters"] = {"config": {
            "models": {"vision_name": str(folder), "use_vicreg_norm": True, "resampler_type": rtype,
                       "latent_dimension": 24, "resampler_config": config},
            "image_processing": {"crop_strategy": "e2p", "image_size": [tiny.SIZE, tiny.SIZE]}}}
    torch.save(ckpt, path)
    stage = load_vision_stage(path, log=lambda m: None)
    norm_w, norm_b = (sd[f"{tiny.PANOLLAVA_PREFIXES[revision][1]}{n}"] for n in ("weight", "bias"))
    with torch.no_grad():
        tokens = ref_encoder(pixel_values=(_PIXELS - 0.5) / 0.5).last_hidden_state
        expected = ref(torch.nn.functional.layer_norm(tokens, (32,), norm_w, norm_b, eps=1e-5))
        got = stage.resampler(extract_features(stage.encoder, _PIXELS, keep_cls_token=True).tokens)
    strip = ref.output_prefix_tokens(0)
    assert got.shape == expected[:, strip:].shape
    assert (got - expected[:, strip:]).abs().max() <= 1e-4


def test_views_follow_panollava_unless_asked(tmp_path, folder, capsys):
    from panoviz_callback.cli import main

    path, _, _ = tiny.panollava_checkpoint(tmp_path / "run" / "last.ckpt", folder, revision="dc64bc5")
    pano = tiny.write_panorama(tmp_path / "room.png")
    common = ["--checkpoint", str(path), "--image", str(pano), "--no_similarity"]
    assert main([*common, "--output_dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "panollava-dc64bc5 convention" in out and "central_crop_ratio" in out
    assert main([*common, "--output_dir", str(tmp_path / "b"), "--view_convention", "py360"]) == 0
    out = capsys.readouterr().out
    assert "convention" not in out and "central_crop_ratio" not in out
    vlm, _ = tiny.module_checkpoint(tmp_path / "vlm" / "last.ckpt")
    code = main(["--checkpoint", str(vlm), "--module", "_tiny_module:TinyVLM", "--image", str(pano),
                 "--view_convention", "panollava", "--output_dir", str(tmp_path / "c")])
    assert code == 2 and "applies to PanoLLaVA checkpoints only" in capsys.readouterr().err
