"""timm adapter: offline weights, timm preprocessing, the three training modes, checkpoints, end-to-end ONNX export.

Tiny timm test models (``test_resnet``, ``test_vit``, random weights) at 32x32 input and 120 digits keep the whole
file at a few tens of seconds on two busy CPU cores.
"""

import argparse
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

from dcss_plugin import DCSS, DCSSModel  # noqa: E402
from dcss_plugin.adapters.timm import (  # noqa: E402
    FrozenFeatureEncoder,
    PretrainedWeightsError,
    TimmEncoder,
    TimmFinetuneEncoder,
    TimmInputError,
    UnknownModelError,
    block_groups,
    create_backbone,
    fit_from_cli_args,
    fit_timm,
    last_block_parameter_names,
    prepare_images,
    timm_autoencoder,
)
from dcss_plugin.training import phase_optimizer  # noqa: E402

FAST = dict(pretrain_epochs=2, phase1_epochs=2, phase2_epochs=3, batch_size=64, seed=0, device="cpu")
SIZE = 32


@pytest.fixture(scope="module", autouse=True)
def _torch_settings(torch_float32_one_thread):
    """Every test here runs with float32 and one torch thread (see conftest.py)."""


@pytest.fixture(scope="module")
def digits(_torch_settings):
    from sklearn.datasets import load_digits

    return load_digits().images[:120].astype(np.float32)  # (120, 8, 8) in [0, 16]


def _weights_file(tmp_path_factory, name, seed=0, **kw):
    torch.manual_seed(seed)
    backbone = create_backbone(name, img_size=SIZE, **kw)
    path = tmp_path_factory.mktemp("weights") / f"{name}.pth"
    torch.save(backbone.state_dict(), path)
    return path, {k: v.clone() for k, v in backbone.state_dict().items()}


class _BackboneCalls:
    """Counts forward calls of timm backbones of one class (a global module hook: no access to internals)."""

    def __init__(self, cls):
        self.cls, self.n = cls, 0

    def __enter__(self):
        def hook(module, args, output):
            if type(module) is self.cls:
                self.n += 1

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---------------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_weights_from_local_file_equal_saved(tmp_path_factory, name):
    path, saved = _weights_file(tmp_path_factory, name, seed=1)
    enc = TimmEncoder(name, path, img_size=SIZE)
    loaded = enc.backbone.state_dict()
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert enc.weights_report["tensors"] == len(saved) and not enc.weights_report["filtered"]
    # safetensors and wrapped / DDP-prefixed checkpoints go through the same offline path (timm's reader)
    st = pytest.importorskip("safetensors.torch")
    st_path = path.with_suffix(".safetensors")
    st.save_file({k: v.contiguous() for k, v in saved.items()}, str(st_path))
    wrapped = path.with_name("wrapped.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in saved.items()}}, wrapped)
    for other in (st_path, wrapped):
        again = TimmEncoder(name, other, img_size=SIZE).backbone.state_dict()
        assert all(torch.equal(again[k], saved[k]) for k in saved)


def test_classifier_weights_are_dropped(tmp_path):
    torch.manual_seed(0)
    full = timm.create_model("test_resnet", pretrained=False, num_classes=1000)  # an ImageNet-style checkpoint
    torch.save(full.state_dict(), tmp_path / "cls.pth")
    enc = TimmEncoder("test_resnet", tmp_path / "cls.pth")
    assert sorted(enc.weights_report["ignored"]) == ["fc.bias", "fc.weight"]
    assert torch.equal(enc.backbone.state_dict()["layer4.0.conv1.weight"], full.state_dict()["layer4.0.conv1.weight"])


def test_vit_weights_for_another_image_size_use_timms_converter(tmp_path_factory):
    path, _ = _weights_file(tmp_path_factory, "test_vit")  # pos_embed for 32x32 (2x2 patches + cls)
    enc = TimmEncoder("test_vit", path, img_size=48)  # 3x3 patches: timm's filter resamples pos_embed
    assert enc.weights_report["filtered"]
    assert enc.backbone.pos_embed.shape[1] == 1 + 9


def test_mismatched_weights_name_keys_and_shapes(tmp_path_factory, tmp_path):
    resnet_path, saved = _weights_file(tmp_path_factory, "test_resnet")
    with pytest.raises(PretrainedWeightsError, match=r"missing key\(s\).*unexpected key\(s\)") as err:
        TimmEncoder("test_vit", resnet_path, img_size=SIZE)
    assert "78 missing key(s) [cls_token, pos_embed" in str(err.value) and "conv1.0.weight" in str(err.value)
    bad = dict(saved)
    bad["layer4.0.conv1.weight"] = torch.zeros(7, 192, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(PretrainedWeightsError, match=r"mismatch.*layer4\.0\.conv1\.weight: file \[7, 192, 3, 3\]"):
        TimmEncoder("test_resnet", tmp_path / "bad.pth", img_size=SIZE)
    torch.save({"w": torch.zeros(1), "not_a_tensor": Fraction(1, 2)}, tmp_path / "pickled.pth")
    with pytest.raises(PretrainedWeightsError, match="weights_only=True"):
        TimmEncoder("test_resnet", tmp_path / "pickled.pth")
    torch.save({**saved, "epoch": 3}, tmp_path / "training.pth")  # readable, but not only tensors
    with pytest.raises(PretrainedWeightsError, match="training checkpoint"):
        TimmEncoder("test_resnet", tmp_path / "training.pth", img_size=SIZE)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        TimmEncoder("test_resnet", tmp_path / "absent.pth")


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(UnknownModelError, match="Did you mean: test_resnet") as err:
        TimmEncoder("test_reznet")
    assert "test_resnet" in err.value.suggestions
    with pytest.raises(UnknownModelError, match="resnet50"):
        create_backbone("timm:resnet5O")


def test_hub_weights_are_refused_with_instructions():
    with pytest.raises(PretrainedWeightsError, match=r"no network.*pretrained_file"):
        TimmEncoder("test_resnet", pretrained=True)
    with pytest.raises(PretrainedWeightsError, match="no network"):
        TimmEncoder("hf-hub:timm/resnet18.a1_in1k")


# ---------------------------------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])  # bilinear and bicubic data configs
def test_prepare_images_equals_timms_transform(digits, name):
    enc = TimmEncoder(name)
    cfg = timm.data.resolve_model_data_config(enc.backbone)
    ref = timm.data.create_transform(**cfg)(torch.from_numpy(digits[:6] / 16.0)[:, None].expand(-1, 3, -1, -1))
    out = prepare_images(digits[:6], enc, value_range=(0, 16))
    assert out.shape == (6, *cfg["input_size"]) == ref.shape
    assert float((out - ref).abs().max()) < 1e-5
    odd = torch.rand(2, 3, 37, 53)  # not square, other size: shorter side resized, center crop
    assert float((enc.preprocess(odd) - timm.data.create_transform(**cfg)(odd)).abs().max()) < 1e-5
    # the encoder applies exactly that preprocessing to images in [0, 1]
    with torch.no_grad():
        assert torch.allclose(enc(torch.from_numpy(digits[:6] / 16.0)[:, None]), enc.backbone(ref), atol=1e-5)


def test_wrong_channels_or_size_are_clear_errors(digits):
    enc = TimmEncoder("test_resnet", img_size=SIZE)
    with pytest.raises(TimmInputError, match="3-channel input.*got 1 channels.*prepare_images"):
        enc.features(torch.rand(2, 1, SIZE, SIZE))
    with pytest.raises(TimmInputError, match="32x32 input.*got 40x40"):
        enc.features(torch.rand(2, 3, 40, 40))
    with pytest.raises(TimmInputError, match="got 2 channels"):
        enc(torch.rand(2, 2, 8, 8))
    with pytest.raises(TimmInputError, match="got 2 channels"):
        prepare_images(np.zeros((2, 2, 8, 8)), enc)
    with pytest.raises(TimmInputError, match=r"images \(N, H, W\) or \(N, C, H, W\)"):
        fit_timm(digits.reshape(len(digits), -1), 10, "test_resnet", img_size=SIZE, **FAST)
    with pytest.raises(TimmInputError, match="got 2 channels"):
        fit_timm(np.random.rand(20, 2, 8, 8), 3, "test_resnet", img_size=SIZE, **FAST)
    with pytest.raises(TypeError, match="unknown option"):
        fit_timm(digits, 10, "test_resnet", img_size=SIZE, linear_path=True, **FAST)
    assert enc.features(enc.prepare(digits[:2])).shape == (2, enc.num_features)


# ---------------------------------------------------------------------------------------------------- frozen mode
@pytest.fixture(scope="module")
def frozen_fit(digits, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache") / "features.npy"
    seen = []
    with _BackboneCalls(timm.models.ResNet) as calls:
        est = fit_timm(digits, 10, "test_resnet", "frozen", img_size=SIZE, feature_batch_size=50, cache_file=cache,
                       mlp_hidden_dims=(64, 64), callback=lambda phase, epoch, stats: seen.append((phase, calls.n)),
                       **FAST)
    return est, cache, seen, calls.n


def test_frozen_mode_caches_features_and_never_runs_the_backbone_while_training(frozen_fit, digits):
    est, cache, seen, total = frozen_fit
    extra = est.history_["timm"]
    assert extra["features"].shape == (120, 96) and cache.exists()
    extraction_passes = math.ceil(120 / 50)
    phase2 = [n for phase, n in seen if phase == "phase2"]
    assert len(phase2) == 3 and set(phase2) == {extraction_passes}  # no backbone pass in any Phase-2 epoch
    assert {n for _, n in seen} == {extraction_passes}  # nor in pretraining or Phase 1
    assert total == extraction_passes  # nor after the fit: labels_, u and q come from the features
    assert np.array_equal(est.labels_, extra["q"].argmax(1)) and extra["u"].shape == (120, 10)
    # a second run reads the .npy cache: zero backbone passes, same features
    with _BackboneCalls(timm.models.ResNet) as calls:
        again = fit_timm(digits, 10, "test_resnet", "frozen", img_size=SIZE, cache_file=cache,
                         mlp_hidden_dims=(64, 64), **{**FAST, "pretrain_epochs": 0, "phase1_epochs": 0,
                                                      "phase2_epochs": 1})
    assert calls.n == 0 and np.array_equal(again.history_["timm"]["features"], extra["features"])
    # the slow alternative (frozen backbone inside the encoder) runs it in every Phase-2 step
    enc, dec = timm_autoencoder(TimmEncoder("test_resnet", img_size=SIZE), 10, finetune="frozen")
    counts = []
    with _BackboneCalls(timm.models.ResNet) as calls:
        DCSS(10, encoder=enc, decoder=dec, verbose=False, **{**FAST, "pretrain_epochs": 0, "phase1_epochs": 0,
                                                              "phase2_epochs": 2}).fit(
            digits, callback=lambda phase, epoch, stats: counts.append(calls.n) if phase == "phase2" else None)
    assert counts[0] > 0 and counts[1] > counts[0]


def test_frozen_model_predicts_on_images_like_the_feature_model(frozen_fit, digits):
    est = frozen_fit[0]
    model = est.model_
    assert isinstance(model, DCSSModel) and isinstance(model.encoder, FrozenFeatureEncoder)
    assert est.input_shape_ == (1, 8, 8) and model.spec["kind"] == "timm-frozen"
    q_images = est.predict_proba(digits)
    assert np.abs(q_images - est.history_["timm"]["q"]).max() < 1e-5  # q of the feature model on the features
    model.encoder.timm.inference_batch_size = 7  # the backbone sees at most 7 images per pass: same result
    assert np.abs(est.predict_proba(digits) - q_images).max() < 1e-6
    model.encoder.timm.inference_batch_size = 256
    assert np.array_equal(est.predict(digits), est.labels_)
    model.train()  # nothing in the frozen pipeline leaves eval mode
    assert not any(m.training for m in model.encoder.modules())


# ---------------------------------------------------------------------------------------------------- last / full
@pytest.fixture(scope="module")
def last_resnet(digits, tmp_path_factory):
    path, initial = _weights_file(tmp_path_factory, "test_resnet", seed=3)
    est = fit_timm(digits, 10, "test_resnet", "last", pretrained_file=path, img_size=SIZE, **FAST)
    return est, initial


@pytest.fixture(scope="module")
def full_vit(digits, tmp_path_factory):
    path, initial = _weights_file(tmp_path_factory, "test_vit", seed=4)
    est = fit_timm(digits, 10, "test_vit", "full", pretrained_file=path, img_size=SIZE, layer_decay=0.75, **FAST)
    return est, initial


def _changed(before, module):
    after = module.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_block_groups_find_the_last_stage():
    resnet = create_backbone("test_resnet")
    assert {n.split(".")[0] for n in last_block_parameter_names(resnet, 1)} == {"layer4"}
    vit = create_backbone("test_vit")
    assert {".".join(n.split(".")[:2]) for n in last_block_parameter_names(vit, 2)} == {
        "blocks.4", "blocks.5", "norm.weight", "norm.bias"}
    groups, head = block_groups(create_backbone("test_convnext"))  # head.norm comes with any last-n choice
    assert head == ["head.norm.weight", "head.norm.bias"] and groups[-1][0].startswith("stages.3")


@pytest.mark.parametrize("name, trained", [("test_resnet", ("layer4.",)), ("test_vit", ("blocks.5.", "norm."))])
def test_last_mode_trains_only_the_last_blocks(digits, tmp_path_factory, last_resnet, name, trained):
    if name == "test_resnet":
        est, initial = last_resnet
    else:
        path, initial = _weights_file(tmp_path_factory, name, seed=5)
        est = fit_timm(digits, 10, name, "last", pretrained_file=path, img_size=SIZE, **FAST)
    backbone = est.model_.encoder.timm.backbone
    changed = _changed(initial, backbone)
    params = {n for n, _ in backbone.named_parameters()}
    should = {n for n in params if n.startswith(trained)}
    assert should and changed & params == should  # every trained parameter moved, no frozen one did
    frozen_stats = {k for k in changed - params if not k.startswith(trained)}
    assert not frozen_stats  # BatchNorm running statistics of frozen stages are untouched (eval mode)
    assert {n for n, p in backbone.named_parameters() if p.requires_grad} == should
    assert np.array_equal(est.predict(digits), est.labels_)


def test_full_mode_trains_everything(full_vit, digits):
    est, initial = full_vit
    backbone = est.model_.encoder.timm.backbone
    assert _changed(initial, backbone) >= {n for n, _ in backbone.named_parameters()}
    assert np.array_equal(est.predict(digits), est.labels_)
    # the estimator's optimizers take the encoder's per-layer groups: 7 decayed backbone rates + the projection
    opt = phase_optimizer(est.model_, "phase2", 1e-3, encoder_lr_factor=0.1)
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert np.allclose(lrs, sorted({1e-4 * 0.1 * 0.75 ** k for k in range(7)} | {1e-4, 1e-3}))


def test_param_groups_apply_layer_decay_as_real_learning_rates():
    enc, dec = timm_autoencoder("test_vit", 10, finetune="full", backbone_lr_scale=0.1, layer_decay=0.5,
                                img_size=SIZE)
    groups = enc.param_groups(1e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in enc.parameters() if p.requires_grad)
    lrs = sorted(g["lr"] for g in groups[1:])
    n_layers = len(lrs)  # stem + 6 blocks
    assert n_layers == 7 and np.allclose(lrs, [1e-4 * 0.5 ** k for k in reversed(range(n_layers))])
    assert groups[0]["lr"] == 1e-3 and groups[0]["name"] == "projection"
    # the lr really acts: Adam's first step moves each parameter by ~its group's lr (|g| >> eps)
    opt = torch.optim.Adam(groups, lr=1e-3)
    before = {id(p): p.detach().clone() for g in groups for p in g["params"]}
    x = torch.rand(8, 1, 8, 8)
    loss = (dec(enc(x)) - dec.reconstruction_target(x)).pow(2).sum() + enc(x).pow(2).sum()
    loss.backward()
    opt.step()
    for g in groups:
        step = max(float((p.detach() - before[id(p)]).abs().max()) for p in g["params"])
        assert step == pytest.approx(g["lr"], rel=0.02), g["name"]
    enc = TimmFinetuneEncoder("test_resnet", 10, finetune="last", img_size=SIZE)
    last = enc.param_groups(1e-3)
    assert [g["name"] for g in last] == ["projection", "backbone"] and last[1]["lr"] == 1e-3
    layer4 = {id(p) for n, p in enc.timm.backbone.named_parameters() if n.startswith("layer4.")}
    assert {id(p) for p in last[1]["params"]} == layer4


def test_decoder_reconstructs_the_initial_backbone_features():
    enc, dec = timm_autoencoder("test_resnet", 10, finetune="full", img_size=SIZE)
    x = torch.rand(4, 1, 8, 8)
    target = dec.reconstruction_target(x)
    assert target.shape == (4, enc.num_features) == dec(enc(x)).shape
    with torch.no_grad():
        for p in enc.timm.backbone.parameters():
            p.add_(1.0)  # training moves the backbone; the target stays that of the initial weights
    assert torch.equal(dec.reconstruction_target(x), target)
    assert all(k.startswith("layers.") for k in dec.state_dict())  # the backbone is saved once, by the encoder
    from sklearn.base import clone  # scikit-learn copies encoder and decoder one by one: the target still holds

    copied = clone(DCSS(10, encoder=enc, decoder=dec))
    assert torch.equal(copied.decoder.reconstruction_target(x), target)


# ---------------------------------------------------------------------------------------------------- persistence
def test_checkpoints_rebuild_the_backbone_from_the_spec(frozen_fit, last_resnet, full_vit, digits, tmp_path):
    for tag, est in (("frozen", frozen_fit[0]), ("last", last_resnet[0]), ("full", full_vit[0])):
        est.save(tmp_path / f"{tag}.pt")  # no weights file needed to load: the tensors are in the checkpoint
        loaded = DCSS.load(tmp_path / f"{tag}.pt")
        assert np.abs(loaded.predict_proba(digits) - est.predict_proba(digits)).max() < 1e-6
        model = DCSSModel.load(tmp_path / f"{tag}.pt")
        assert model.spec["kind"] == est.model_.spec["kind"] == f"timm-{'frozen' if tag == 'frozen' else 'finetune'}"
        assert torch.equal(model.predict(torch.from_numpy(digits)[:, None]), torch.from_numpy(est.predict(digits)))


# ---------------------------------------------------------------------------------------------------- export
def _check_onnx(est, path, digits):
    runtime = pytest.importorskip("dcss_plugin.export.runtime")
    pytest.importorskip("onnxruntime")
    out = runtime.OnnxClusterAssigner(path, provider="cpu")(digits)
    assert np.array_equal(out.label, est.predict(digits))
    assert np.abs(out.q - est.predict_proba(digits)).max() < 1e-4


def test_onnx_full_export_of_every_mode_and_of_checkpoints(frozen_fit, last_resnet, full_vit, digits, tmp_path):
    onnx = pytest.importorskip("onnx")
    from dcss_plugin.export.onnx import export_assigner

    for tag, est in (("frozen", frozen_fit[0]), ("last", last_resnet[0]), ("full", full_vit[0])):
        path = export_assigner(est, tmp_path / f"{tag}.onnx", full=True, check_data=digits)
        _check_onnx(est, path, digits)
        dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_value for d in dims[1:]] == [1, 8, 8]  # raw digits in, backbone inside
    est = last_resnet[0]
    est.save(tmp_path / "checkpoint.pt")
    path = export_assigner(tmp_path / "checkpoint.pt", tmp_path / "from_ckpt.onnx", full=True, check_data=digits)
    _check_onnx(est, path, digits)


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_entry_point(digits, tmp_path):
    args = argparse.Namespace(backbone="timm:test_resnet", pretrained_file=None, pretrained=False,
                              finetune="frozen", img_size=SIZE, clusters=4, seed=0, preset="default",
                              device="cpu", quiet=True, out=str(tmp_path))
    est = fit_from_cli_args(args, torch.from_numpy(digits[:60]),
                            {"pretrain_epochs": 1, "phase1_epochs": 1, "phase2_epochs": 1, "batch_size": 64})
    assert isinstance(est, DCSS) and est.labels_.shape == (60,) and (tmp_path / "features.npy").exists()
    assert np.array_equal(est.predict(digits[:60]), est.labels_)
    args.backbone = "resnet18"
    with pytest.raises(ValueError, match="timm:MODEL_NAME"):
        fit_from_cli_args(args, digits[:60])
