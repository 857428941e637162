"""Tests of panoviz_callback.models: resamplers, VICReg, the data module and the training module."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from panoviz_callback.models import VICRegOverlapLoss, build_resampler, strip_correspondence
from panoviz_callback.models.vicreg import vicreg_terms


# ---------------------------------------------------------------------------------------------- resamplers
@pytest.mark.parametrize(
    ("kind", "out_dim", "expected_n", "layout"),
    [("identity", 32, 12, "grid"), ("mlp", 24, 12, "grid"), ("qformer", 24, 5, "queries"),
     ("perceiver", 24, 5, "queries")],
)
def test_resampler_cardinality(kind, out_dim, expected_n, layout):
    torch.manual_seed(0)
    r = build_resampler(kind, 32, out_dim, num_queries=5)
    out = r(torch.randn(3, 12, 32))
    assert out.shape == (3, expected_n, out_dim)
    assert r.output_layout == layout
    assert (r.in_dim, r.out_dim) == (32, out_dim)
    assert torch.isfinite(out).all()
    if layout == "queries":
        assert r.num_queries == 5
        out.sum().backward()
        assert r.queries.grad is not None and r.queries.grad.abs().sum() > 0


def test_resampler_identity_is_identity():
    r = build_resampler("identity", 16)
    x = torch.randn(2, 4, 16)
    assert isinstance(r, nn.Identity) and r(x) is x and r.out_dim == 16


@pytest.mark.parametrize(("in_dim", "out_dim"), [(48, 32), (32, 48)])
def test_mlp_structure_matches_panollava(in_dim, out_dim):
    r = build_resampler("mlp", in_dim, out_dim)
    kinds = [type(m) for m in r.mlp]
    assert kinds == [nn.Linear, nn.LayerNorm, nn.GELU, nn.Linear, nn.LayerNorm, nn.GELU, nn.Linear]
    hidden = max(in_dim, out_dim)
    assert r.hidden_dim == hidden
    shapes = {k: tuple(v.shape) for k, v in r.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (hidden, in_dim), "mlp.0.bias": (hidden,),
        "mlp.1.weight": (hidden,), "mlp.1.bias": (hidden,),
        "mlp.3.weight": (hidden, hidden), "mlp.3.bias": (hidden,),
        "mlp.4.weight": (hidden,), "mlp.4.bias": (hidden,),
        "mlp.6.weight": (out_dim, hidden), "mlp.6.bias": (out_dim,),
    }
    assert r.mlp[1].eps == 1e-5


def test_mlp_loads_a_panollava_state_dict():
    # PanoLLaVA's MLPResampler(vision_dim, latent_dim) layout, written out independently
    hidden = 40
    ref = nn.Sequential(nn.Linear(40, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, hidden),
                        nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, 24))
    ckpt = {f"model.resampler_module.resampler.mlp.{k}": v for k, v in ref.state_dict().items()}
    prefix = "model.resampler_module.resampler."
    r = build_resampler("mlp", 40, 24)
    r.load_state_dict({k[len(prefix):]: v for k, v in ckpt.items()}, strict=True)
    x = torch.randn(2, 6, 40)
    torch.testing.assert_close(r(x), ref(x))


def test_resampler_exceptions():
    with pytest.raises(ValueError, match="Argument `kind` must be one of"):
        build_resampler("mlps", 8, 8)
    with pytest.raises(ValueError, match="`out_dim` must equal `in_dim`"):
        build_resampler("identity", 8, 16)
    with pytest.raises(ValueError, match="`heads` must divide"):
        build_resampler("qformer", 8, 30, heads=4)
    with pytest.raises(ValueError, match="Argument `num_queries` must be in"):
        build_resampler("perceiver", 8, 16, num_queries=0)
    with pytest.raises(ValueError, match=r"Expected `tokens` of shape \(V, N, 8\)"):
        build_resampler("qformer", 8, 16)(torch.zeros(2, 3, 9))


# ---------------------------------------------------------------------------------------------- VICReg
def _reference_terms(a: np.ndarray, b: np.ndarray, gamma=1.0, eps=1e-4):
    """Per-pair VICReg terms written out with NumPy loops (Bardes et al. 2022 reference code)."""
    m, d = a.shape
    inv = ((a - b) ** 2).mean()

    def var(x):
        return np.mean([max(0.0, gamma - math.sqrt(x[:, k].var(ddof=1) + eps)) for k in range(d)])

    def cov(x):
        c = np.cov(x, rowvar=False, ddof=1)
        return sum(c[p, q] ** 2 for p in range(d) for q in range(d) if p != q) / d

    return inv, 0.5 * (var(a) + var(b)), cov(a) + cov(b)


def test_vicreg_terms_known_values():
    x = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])[None]  # decorrelated, var 4/3
    inv, var, cov = vicreg_terms(x, x)
    assert inv.item() == 0.0 and var.item() == 0.0 and cov.item() == pytest.approx(0.0, abs=1e-12)
    inv, _, _ = vicreg_terms(x, x + 1.0)
    assert inv.item() == pytest.approx(1.0)
    const = torch.full((1, 5, 3), 0.7)
    _, var, cov = vicreg_terms(const, const)
    assert var.item() == pytest.approx(1.0 - math.sqrt(1e-4))  # gamma - sqrt(eps) = 0.99 on each side
    assert cov.item() == 0.0
    _, var, _ = vicreg_terms(const, const, gamma=2.0)
    assert var.item() == pytest.approx(1.99)
    y = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])[None]  # fully correlated: cov = [[1, 1], [1, 1]]
    _, _, cov = vicreg_terms(y, y)
    assert cov.item() == pytest.approx(2 * (2 * 1.0**2) / 2)


def test_vicreg_loss_against_numpy_reference():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 3, 6, 4, generator=g, dtype=torch.float64)  # (B, V, N, D)
    pairs = [(0, 1), (1, 2), (2, 0)]
    corr = {(0, 1): (torch.tensor([1, 2, 5]), torch.tensor([0, 3, 4])),
            (1, 2): (torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 4, 5])),
            (2, 0): (torch.tensor([4]), torch.tensor([0]))}  # one token pair only: skipped
    loss_fn = VICRegOverlapLoss(sim_weight=2.0, var_weight=3.0, cov_weight=0.5, gamma=1.5)
    loss, terms = loss_fn(feats, pairs, corr)
    f = feats.numpy()
    ref = np.mean([_reference_terms(f[bb, i][corr[(i, j)][0]], f[bb, j][corr[(i, j)][1]], gamma=1.5)
                   for bb in range(2) for i, j in pairs[:2]], axis=0)
    got = [terms["invariance"].item(), terms["variance"].item(), terms["covariance"].item()]
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert loss.item() == pytest.approx(2.0 * ref[0] + 3.0 * ref[1] + 0.5 * ref[2], rel=1e-5)
    assert loss.dtype == torch.float32


def test_vicreg_query_layout_pairs_same_index():
    feats = torch.randn(1, 2, 5, 3)
    loss_fn = VICRegOverlapLoss()
    _, by_index = loss_fn(feats, [(0, 1)], None)
    ar = torch.arange(5)
    _, explicit = loss_fn(feats, [(0, 1)], {(0, 1): (ar, ar)})
    for k in by_index:
        torch.testing.assert_close(by_index[k], explicit[k])


def test_vicreg_no_overlap_gives_differentiable_zero():
    feats = torch.randn(1, 2, 4, 3, requires_grad=True)
    loss, terms = VICRegOverlapLoss()(feats, [(0, 1)], {(0, 1): (torch.zeros(0, dtype=torch.long),) * 2})
    assert loss.item() == 0.0 and terms["variance"].item() == 0.0
    loss.backward()
    assert feats.grad is not None


def test_vicreg_exceptions():
    with pytest.raises(ValueError, match="Argument `pairing` must be one of"):
        VICRegOverlapLoss(pairing="columns")
    with pytest.raises(ValueError, match="Argument `sim_weight` must be in"):
        VICRegOverlapLoss(sim_weight=-1.0)
    with pytest.raises(ValueError, match=r"Expected `feats` of shape \(B, V, N, D\)"):
        VICRegOverlapLoss()(torch.zeros(2, 4, 8), [(0, 1)], None)


def test_strip_correspondence_convention():
    idx_i, idx_j = strip_correspondence((2, 4), 0.5)
    assert idx_i.tolist() == [2, 3, 6, 7] and idx_j.tolist() == [0, 1, 4, 5]
    idx_i, idx_j = strip_correspondence((3, 7), 0.5)  # k = int(3.5) = 3 columns
    assert idx_i.tolist() == [4, 5, 6, 11, 12, 13, 18, 19, 20]
    assert idx_j.tolist() == [0, 1, 2, 7, 8, 9, 14, 15, 16]
    assert strip_correspondence((2, 4), 0.01)[0].tolist() == [3, 7]  # at least one column
    with pytest.raises(ValueError, match="Argument `overlap` must be in"):
        strip_correspondence((2, 4), 0.0)


def test_strip_and_geometric_pairing_differ_for_e2p():
    from panoviz_callback.correspondence import patch_correspondence
    from panoviz_callback.views import make_views

    views = make_views(torch.zeros(3, 64, 128), "e2p", 224)  # 90 deg, 50 % overlap, 14 x 14 tokens
    geometric = VICRegOverlapLoss(pairing="geometric").correspondences(views, (14, 14))
    strip = VICRegOverlapLoss(pairing="strip").correspondences(views, (14, 14))
    assert sorted(geometric) == sorted(strip) == sorted(views.pairs)
    for (i, j), (gi, gj) in geometric.items():
        ref_i, ref_j = patch_correspondence(views, i, j, (14, 14))
        assert torch.equal(gi, ref_i) and torch.equal(gj, ref_j)
    gi, gj = geometric[(0, 1)]
    si, sj = strip[(0, 1)]
    assert len(si) == 14 * 7
    geo_pairs = set(zip(gi.tolist(), gj.tolist()))
    strip_pairs = set(zip(si.tolist(), sj.tolist()))
    # the strip scheme pairs tokens that do not see the same point (off by one or more tokens)
    assert len(strip_pairs - geo_pairs) > len(strip_pairs) // 4
    # the partner of a strip token is on the same row; the true partner drifts towards the centre row
    assert any((a // 14) != (b // 14) for a, b in geo_pairs)
    assert all((a // 14) == (b // 14) for a, b in strip_pairs)


# ---------------------------------------------------------------------------------------------- data module
def test_data_module_synthetic_cardinality_and_reproducibility():
    from panoviz_callback.models import PanoDataModule

    dm = PanoDataModule(num_synthetic=3, image_size=32, batch_size=2, num_val=1, seed=5)
    dm.setup("fit")
    assert dm.num_views == 8
    assert len(dm.train_set) == 3 and len(dm.val_set) == 1
    assert dm.train_set.panorama(0).shape == (3, 64, 128)  # synthetic_height defaults to 2 * image_size
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy())
    batches = [b for b in dm.train_dataloader()]
    assert torch.equal(rng[0], torch.get_rng_state()) and np.array_equal(rng[1], np.random.get_state()[1])
    assert [tuple(b["pixels"].shape) for b in batches] == [(2, 8, 3, 32, 32), (1, 8, 3, 32, 32)]
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == [0, 1, 2]
    # same (index, epoch): same yaw; another epoch: another yaw; plain index: no rotation
    assert torch.equal(dm.train_set[(1, 0)]["pixels"], dm.train_set[(1, 0)]["pixels"])
    assert not all(torch.equal(dm.train_set[(i, 0)]["pixels"], dm.train_set[(i, 1)]["pixels"]) for i in range(3))
    from panoviz_callback.views import make_views

    plain = make_views(dm.train_set.panorama(1), "e2p", 32).pixels
    assert torch.equal(dm.train_set[1]["pixels"], plain)
    val = next(iter(dm.val_dataloader()))["pixels"]
    assert torch.equal(val[0], make_views(dm.val_set.panorama(0), "e2p", 32).pixels)
    # the epoch reaches the items: two passes give two orders/yaws, a second module repeats them
    loader = dm.train_dataloader()
    first, second = (torch.cat([b["pixels"] for b in loader]) for _ in range(2))
    assert not torch.equal(first, second)
    dm2 = PanoDataModule(num_synthetic=3, image_size=32, batch_size=2, num_val=1, seed=5, num_workers=2)
    dm2.setup("fit")
    assert torch.equal(torch.cat([b["pixels"] for b in dm2.train_dataloader()]), first)  # workers: same data
    from lightning.pytorch.utilities.model_helpers import is_overridden

    assert is_overridden("val_dataloader", dm)
    assert not is_overridden("val_dataloader", PanoDataModule(num_synthetic=2, image_size=32))  # num_val=0


def test_data_module_folder(tmp_path):
    from PIL import Image

    from panoviz_callback.models import PanoDataModule

    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (64, 128), "b.jpg": (96, 192), "c.png": (80, 160)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    dm = PanoDataModule(str(tmp_path), image_size=32, batch_size=2, num_val=1, crop_strategy="cubemap", max_width=160)
    dm.setup("fit")
    assert [p.rsplit("/", 1)[-1] for p in dm.train_set.sources] == ["a.png", "b.jpg"]
    assert [p.rsplit("/", 1)[-1] for p in dm.val_set.sources] == ["c.png"]
    assert dm.train_set.panorama(1).shape == (3, 80, 160)  # downscaled to max_width
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixels"].shape == (2, 4, 3, 32, 32)
    with pytest.raises(ValueError, match="need more than num_val=3"):
        PanoDataModule(str(tmp_path), num_val=3).setup("fit")
    with pytest.raises(ValueError, match="Argument `data_dir` must be a folder"):
        PanoDataModule(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="Argument `batch_size` must be in"):
        PanoDataModule(batch_size=0)


# ---------------------------------------------------------------------------------------------- the module
_SIZE = 64  # 4 x 4 tokens of the tiny encoder (patch 16): fast on a CPU


def _tiny_module(**kwargs):
    from panoviz_callback.models import PanoVisionModule

    torch.manual_seed(0)
    return PanoVisionModule("tiny", vision_overrides={"image_size": _SIZE}, image_size=_SIZE, **kwargs)


def _probe_overlap_cosine(model, views) -> float:
    """Plain mean cosine of the resampled tokens over the geometric token pairs of every view pair."""
    from panoviz_callback.correspondence import patch_correspondence

    with torch.no_grad():
        z = model(views.pixels)  # (V, N, D)
    grid = (_SIZE // 16, _SIZE // 16)
    cos = [torch.nn.functional.cosine_similarity(z[i, a], z[j, b], dim=-1).mean()
           for i, j in views.pairs for a, b in [patch_correspondence(views, i, j, grid)]]
    return torch.stack(cos).mean().item()


class _LossRecorder:
    def __new__(cls):
        import lightning.pytorch as pl

        class Recorder(pl.Callback):
            def __init__(self):
                self.losses: list[list[float]] = []

            def on_train_epoch_start(self, trainer, pl_module):
                self.losses.append([])

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.losses[-1].append(float(outputs["loss"]))

        return Recorder()


def _fit(trainer, model, datamodule) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds waiting on a busy CI machine (10x here)
    try:
        with warnings.catch_warnings():
            # the frozen encoder is in eval on purpose (PanoVisionModule's Convention)
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
            warnings.filterwarnings("ignore", message=r".*`validation_step` but have no `val_dataloader`")
            trainer.fit(model, datamodule)
    finally:
        torch.set_num_threads(threads)


def _quick_trainer(**kwargs):
    import lightning.pytorch as pl

    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train the MLP module for 3 short epochs on synthetic panoramas; keep what the tests compare."""
    import lightning.pytorch as pl

    from panoviz_callback.models import PanoDataModule
    from panoviz_callback.panorama import synthetic_panorama
    from panoviz_callback.views import make_views

    model = _tiny_module(lr=3e-3)
    encoder_before = {k: v.clone() for k, v in model.vision_encoder.state_dict().items()}
    probe = make_views(synthetic_panorama(2 * _SIZE, seed=100), "e2p", _SIZE)  # a scene not trained on
    model.eval()
    before = _probe_overlap_cosine(model, probe)
    dm = PanoDataModule(num_synthetic=8, image_size=_SIZE, batch_size=2, num_val=1)
    recorder = _LossRecorder()
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         callbacks=[recorder], default_root_dir=tmp_path_factory.mktemp("fit"))
    _fit(trainer, model, dm)
    encoder_modes = {name: m.training for name, m in model.vision_encoder.named_modules()}
    model.eval()
    after = _probe_overlap_cosine(model, probe)
    return {"model": model, "trainer": trainer, "losses": recorder.losses, "before": before, "after": after,
            "encoder_before": encoder_before, "encoder_modes": encoder_modes, "probe": probe,
            "dir": tmp_path_factory.mktemp("ckpt")}


def test_module_trains_and_loss_decreases(trained):
    losses = trained["losses"]
    assert [len(epoch) for epoch in losses] == [4, 4, 4]
    assert np.mean(losses[-1]) < np.mean(losses[0]) - 0.2
    metrics = trained["trainer"].callback_metrics
    assert {"train/loss", "train/invariance", "train/variance", "train/covariance", "val/loss"} <= set(metrics)


def test_module_vicreg_raises_overlap_cosine(trained):
    # the product behaviour: tokens that see the same scene point agree more after training
    assert trained["after"] > trained["before"] + 0.05, (trained["before"], trained["after"])


def test_module_frozen_encoder_untouched(trained):
    model = trained["model"]
    for name, value in model.vision_encoder.state_dict().items():
        assert torch.equal(value, trained["encoder_before"][name]), name
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())
    assert not any(trained["encoder_modes"].values())  # in eval during the whole fit
    model.train()
    assert model.training and model.resampler.training and not model.vision_encoder.training


def test_module_checkpoint_roundtrip(trained):
    from panoviz_callback.models import PanoVisionModule

    path = trained["dir"] / "model.ckpt"
    trained["trainer"].save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["vision_name"] == "tiny" and hp["vision_overrides"] == {"image_size": _SIZE}
    assert hp["image_size"] == _SIZE and hp["latent_dimension"] == 64 and hp["resampler_type"] == "mlp"
    assert ckpt["datamodule_hyper_parameters"]["crop_strategy"] == "e2p"
    assert {k.split(".")[0] for k in ckpt["state_dict"]} == {"vision_encoder", "resampler", "projector"}
    model = trained["model"].eval()
    pixels = trained["probe"].pixels
    restored = PanoVisionModule.load_from_checkpoint(path, weights_only=True).eval()
    with torch.no_grad():
        assert torch.equal(restored(pixels), model(pixels))
    # the vision stage alone, from hyper_parameters and the documented prefixes
    encoder, resampler = PanoVisionModule.build_vision_stage(hp, pretrained=False)
    sd = ckpt["state_dict"]
    encoder.load_state_dict({k[len("vision_encoder."):]: v for k, v in sd.items() if k.startswith("vision_encoder.")})
    resampler.load_state_dict({k[len("resampler."):]: v for k, v in sd.items() if k.startswith("resampler.")})
    from panoviz_callback.features import extract_features

    with torch.no_grad():
        tokens = resampler(extract_features(encoder.eval(), pixels).tokens)
        assert torch.equal(tokens, model(pixels))


def test_module_query_resampler_trainable_blocks_anyres():
    from panoviz_callback.models import PanoDataModule

    model = _tiny_module(resampler_type="perceiver", num_queries=4, latent_dimension=32, projector_dim=0,
                         trainable_last_blocks=1, crop_strategy="anyres_e2p")
    from panoviz_callback.models.module import _encoder_blocks

    blocks = _encoder_blocks(model.vision_encoder)
    assert len(blocks) == 2  # the tiny preset's transformer blocks
    last = next(name for name, m in model.vision_encoder.named_modules() if m is blocks[1]) + "."
    trainable = {n for n, p in model.vision_encoder.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.vision_encoder.named_parameters() if n.startswith(last)}
    before = {k: v.clone() for k, v in model.vision_encoder.state_dict().items()}
    dm = PanoDataModule(num_synthetic=2, image_size=_SIZE, batch_size=2, crop_strategy="anyres_e2p")
    _fit(_quick_trainer(max_steps=2), model, dm)
    after = model.vision_encoder.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(last) for k in changed)
    model.train()
    assert blocks[1].training and not blocks[0].training and not model.vision_encoder.training
    (pairs, corr), = model._geometry.values()
    assert corr is None  # queries: query k of view i with query k of view j
    assert len(pairs) == 8 and all(0 not in p for p in pairs)  # the global view takes part in no pair
    assert model(torch.rand(9, 3, _SIZE, _SIZE)).shape == (9, 4, 32)


def test_module_rejects_other_crop_settings():
    from panoviz_callback.models import PanoDataModule

    model = _tiny_module()
    dm = PanoDataModule(num_synthetic=2, image_size=_SIZE, crop_strategy="cubemap")
    with pytest.raises(ValueError, match="give both the same crop settings"):
        _fit(_quick_trainer(max_steps=1), model, dm)


def test_module_exceptions():
    with pytest.raises(ValueError, match="Argument `resampler_type` must be one of"):
        _tiny_module(resampler_type="conv")
    with pytest.raises(ValueError, match="Argument `pairing` must be one of"):
        _tiny_module(pairing="columns")
    with pytest.raises(ValueError, match=r"Argument `trainable_last_blocks` must be in \[0, 2\]"):
        _tiny_module(trainable_last_blocks=3)
    with pytest.raises(ValueError, match="`out_dim` must equal `in_dim`"):
        _tiny_module(resampler_type="identity", latent_dimension=32)


def test_build_vision_stage_from_foreign_hparams():
    from panoviz_callback.models import PanoVisionModule

    # PanoLLaVA-style hyper_parameters: extra keys are ignored, missing ones take the defaults
    hparams = {"vision_name": "tiny", "resampler_type": "mlp", "latent_dimension": 32, "language_model_name": "x",
               "vision_overrides": {"image_size": _SIZE}}
    encoder, resampler = PanoVisionModule.build_vision_stage(hparams)
    assert encoder.config.image_size == _SIZE and not encoder.training
    assert (resampler.in_dim, resampler.out_dim, resampler.hidden_dim) == (64, 32, 64)
    assert PanoVisionModule.encoder_attr == "vision_encoder" and PanoVisionModule.resampler_attr == "resampler"


def test_vision_stage_matches_the_lightning_module():
    import inspect

    from panoviz_callback.models import PanoVisionModule, PanoVisionStage
    from panoviz_callback.models.stage import STAGE_DEFAULTS

    defaults = {k: p.default for k, p in inspect.signature(PanoVisionModule.__init__).parameters.items()}
    assert {k: defaults[k] for k in STAGE_DEFAULTS} == STAGE_DEFAULTS
    hp = {"vision_name": "tiny", "vision_overrides": {"image_size": 32, "patch_size": 8}, "image_size": 32,
          "projector_dim": 8, "latent_dimension": 16}
    torch.manual_seed(0)
    module = PanoVisionModule(**hp)
    stage = PanoVisionStage(**hp, lr=0.1)  # other hyper-parameters are ignored
    own = {k for k in module.state_dict() if not k.startswith("projector.")}
    assert set(stage.state_dict()) == own  # same prefixes: a PanoVisionModule checkpoint loads as is
    stage.load_state_dict({k: v for k, v in module.state_dict().items() if k in own})
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(module.resampler(module.vision_encoder(pixels).last_hidden_state),
                           stage.resampler(stage.vision_encoder(pixels).last_hidden_state))
