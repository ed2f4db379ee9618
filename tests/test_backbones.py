"""Net1D fidelity to ECGFounder (golden fixture, key manifest), the BP model's shapes,
fusion, constraints, freezing and optimiser groups, and every pre-trained loading path."""
import argparse
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

import backbones as bb
from backbones import (ARCHS, DEFAULT_FUSION, FUSIONS, MODALITY_CHANNELS, BPModelConfig,
                       Net1D, bound_output, build_bp_model, load_pretrained, param_groups)
from conftest import DATA
from utils import UserError, load_checkpoint, save_checkpoint

FIXTURE = os.path.join(DATA, "net1d_tiny_ecgfounder_format.pth")
GOLDEN = np.load(os.path.join(DATA, "net1d_tiny_golden_io.npz"))
MANIFEST = json.load(open(os.path.join(DATA, "ecgfounder_1lead_keys.json")))
LAYOUTS = [("ecg", "late"), ("ppg", "late"), ("both", "late"), ("both", "mid"), ("both", "early")]
ENCODERS = {"ecg": ["ecg"], "ppg": ["ppg"], "late": ["ecg", "ppg"], "mid": ["ecg", "ppg"],
            "early": ["both"]}


def fixture_state():
    return load_checkpoint(FIXTURE)["state_dict"]


def encoder_state():
    return {k: v for k, v in fixture_state().items() if not k.startswith("dense.")}


def tiny_model(modality="both", fusion="late", **kwargs):
    torch.manual_seed(0)
    return build_bp_model(BPModelConfig(arch="tiny", modality=modality, fusion=fusion,
                                        n_targets=3, **kwargs))


def encoder_names(modality, fusion):
    return ENCODERS[fusion if modality == "both" else modality]


def assert_encoder_holds(encoder, state, widened=False):
    own = encoder.state_dict()
    assert own.keys() == state.keys()
    for key, value in state.items():
        if widened and key == bb.WIDENED_KEY:
            torch.testing.assert_close(own[key][:, :1], value, rtol=0, atol=0)
            assert own[key][:, 1:].abs().max() == 0
        else:
            torch.testing.assert_close(own[key], value, rtol=0, atol=0)


# ----------------------------------------------------------------------------- Net1D fidelity
@pytest.mark.parametrize("length", [7500, 1001, 37])
def test_tiny_net1d_reproduces_golden_features_and_logits(length):
    net = Net1D(ARCHS["tiny"], n_classes=3)
    net.load_state_dict(fixture_state(), strict=True)
    net.eval()
    x = torch.from_numpy(GOLDEN[f"x_{length}"])
    with torch.no_grad():
        features, logits = net.features(x), net(x)
    np.testing.assert_allclose(features.numpy(), GOLDEN[f"features_{length}"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits.numpy(), GOLDEN[f"logits_{length}"], atol=1e-5, rtol=0)


def test_applying_the_stored_batchnorms_would_break_the_golden_output():
    net = Net1D(ARCHS["tiny"], n_classes=3, use_bn=True)
    net.load_state_dict(fixture_state(), strict=True)
    net.eval()
    with torch.no_grad():
        features = net.features(torch.from_numpy(GOLDEN["x_1001"])).numpy()
    assert np.abs(features - GOLDEN["features_1001"]).max() > 0.1


def test_published_classifier_matches_manifest_key_for_key():
    with torch.device("meta"):
        net = Net1D(ARCHS["ecgfounder"], n_classes=150)
    shapes = [(k, list(v.shape)) for k, v in net.state_dict().items()]
    assert shapes == [(k, s) for k, s in MANIFEST["keys"]]
    assert len(shapes) == 509
    assert bb.count_parameters(net)[0] == MANIFEST["total_params"] == 30_807_750


@pytest.mark.parametrize("modality, fusion", LAYOUTS)
def test_ecgfounder_bp_encoders_hold_manifest_keys_less_dense(modality, fusion):
    expected = {k: s for k, s in MANIFEST["keys"] if not k.startswith("dense.")}
    with torch.device("meta"):
        model = build_bp_model(dict(arch="ecgfounder", modality=modality, fusion=fusion))
    assert list(model.encoders) == encoder_names(modality, fusion)
    for name, encoder in model.encoders.items():
        shapes = {k: list(v.shape) for k, v in encoder.state_dict().items()}
        if name == "both":
            assert shapes.pop(bb.WIDENED_KEY) == [64, 2, 16]
            expected.pop(bb.WIDENED_KEY, None)
        assert shapes == expected


def test_full_size_encoder_forward_on_short_input():
    torch.manual_seed(0)
    net = Net1D(ARCHS["ecgfounder"])
    x = torch.randn(1, 1, 300)
    with torch.no_grad():
        fmap = net.feature_map(x)
        pooled = net(x)
    # 300 -> 150 (first conv) -> 75, 38, 19, 10, 5, 3, 2 (seven stride-2 stages)
    assert fmap.shape == (1, 1024, 2)
    torch.testing.assert_close(pooled, fmap.mean(-1))
    assert torch.isfinite(pooled).all() and pooled.abs().max() > 0


def test_unused_batchnorms_are_not_trainable_but_stay_in_state_dict():
    net = Net1D(ARCHS["tiny"])
    bn_params = {n for n, p in net.named_parameters() if "bn" in n}
    assert bn_params and not any(p.requires_grad for n, p in net.named_parameters()
                                 if n in bn_params)
    with_bn = Net1D(ARCHS["tiny"], use_bn=True)
    frozen = {n for n, p in with_bn.named_parameters() if not p.requires_grad}
    # with use_bn only the first block's bn1 is never applied (ECGFounder's is_first_block)
    assert frozen == {"stage_list.0.block_list.0.bn1.weight", "stage_list.0.block_list.0.bn1.bias"}


def test_bad_net1d_config_is_a_user_error():
    with pytest.raises(UserError, match="groups of width"):
        Net1D(ARCHS["tiny"], groups_width=5)


# ----------------------------------------------------------------------------- BP model shapes
@pytest.mark.parametrize("arch", ["tiny", "small", "base"])
@pytest.mark.parametrize("modality, fusion", LAYOUTS)
def test_output_shape_every_arch_modality_fusion(arch, modality, fusion):
    model = build_bp_model(dict(arch=arch, modality=modality, fusion=fusion, n_targets=5))
    x = torch.randn(2, len(MODALITY_CHANNELS[modality]), 300)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 5)
    assert out.abs().max() == 0  # zero-initialised last layer: the train mean
    assert list(model.encoders) == encoder_names(modality, fusion)


@pytest.mark.parametrize("modality, fusion", LAYOUTS)
def test_output_shape_ecgfounder_on_meta_device(modality, fusion):
    with torch.device("meta"):
        model = build_bp_model(dict(arch="ecgfounder", modality=modality, fusion=fusion,
                                    n_targets=5))
        out = model(torch.empty(4, len(MODALITY_CHANNELS[modality]), 7500))
    assert out.shape == (4, 5)


def test_fusion_feature_widths_and_late_features_come_from_each_channel():
    x = torch.randn(2, 2, 500)
    late, mid, early = (tiny_model(fusion=f) for f in ("late", "mid", "early"))
    with torch.no_grad():
        pooled = late.pooled_features(x)
        ecg = late.encoders["ecg"].features(x[:, :1])
        ppg = late.encoders["ppg"].features(x[:, 1:])
        assert mid.pooled_features(x).shape == (2, 24 + 24 + 24)  # fusion_channels = width
        assert early.pooled_features(x).shape == (2, 24)
    torch.testing.assert_close(pooled, torch.cat([ecg, ppg], dim=1))


def test_single_modality_normalises_fusion_and_wrong_channel_count_fails():
    model = tiny_model(modality="ppg", fusion="mid")
    assert model.config.fusion == "none" and list(model.encoders) == ["ppg"]
    with pytest.raises(ValueError, match=r"\(B, 1, L\)"):
        model(torch.zeros(2, 2, 100))


def test_default_fusion_and_modality_channels():
    assert DEFAULT_FUSION in FUSIONS
    assert MODALITY_CHANNELS == {"ecg": (0,), "ppg": (1,), "both": (0, 1), "none": ()}


def test_model_rebuilds_from_stored_config_even_if_arch_changes(tmp_path, monkeypatch):
    model = tiny_model(fusion="mid", constrain="clip", n_covariates=2)
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint(path, {"model": model.state_dict(),
                           "model_config": dataclasses.asdict(model.config)})
    monkeypatch.setitem(ARCHS, "tiny", ARCHS["small"])
    ckpt = torch.load(path, weights_only=True)
    rebuilt = build_bp_model(ckpt["model_config"])
    rebuilt.load_state_dict(ckpt["model"], strict=True)
    assert rebuilt.config == model.config
    assert rebuilt.config.net1d["filter_list"] == [8, 16, 16, 24]


@pytest.mark.parametrize("change, fragment", [
    ({"arch": "huge"}, "--arch"), ({"fusion": "sideways"}, "--fusion"),
    ({"modality": "eeg"}, "--modality"), ({"constrain": "relu"}, "--constrain"),
    ({"n_targets": 0}, "n_targets"), ({"dropout": 1.0}, "dropout"), ({"colour": 1}, "colour"),
])
def test_bad_model_config_is_a_user_error(change, fragment):
    with pytest.raises(UserError, match=fragment):
        build_bp_model({"arch": "tiny", **change})


def test_covariates_feed_the_head():
    model = tiny_model(modality="ecg", n_covariates=2)
    torch.nn.init.normal_(model.head.mlp[-1].weight)
    x = torch.randn(3, 1, 200)
    cov = torch.zeros(3, 2)
    with torch.no_grad():
        base = model(x, cov)
        moved = model(x, cov + torch.tensor([1.0, 0.0]))
    assert base.shape == (3, 3) and (moved - base).abs().min() > 0
    with pytest.raises(ValueError, match="covariates"):
        model(x)
    with pytest.raises(ValueError, match="covariates"):
        tiny_model(modality="ecg")(x, cov)


def test_covariates_only_model_has_no_encoder_and_reads_only_covariates():
    model = tiny_model(modality="none", n_covariates=3)
    assert not list(model.encoders) and model.config.fusion == "none"
    assert isinstance(model.head.norm, torch.nn.Identity)
    torch.nn.init.normal_(model.head.mlp[-1].weight)
    cov = torch.randn(4, 3)
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(4, 0, 0), cov)
        # the placeholder's length does not matter; the covariates do
        torch.testing.assert_close(model(torch.zeros(4, 0, 50), cov), out)
        assert (model(torch.zeros(4, 0, 0), cov + 1.0) - out).abs().min() > 0
    model.train()
    model(torch.zeros(4, 0, 0), cov).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(UserError, match="covariates-only model: give --covariates"):
        tiny_model(modality="none")


def test_an_empty_covariate_tensor_counts_as_none():
    model = tiny_model(modality="ecg")
    x = torch.randn(2, 1, 200)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.zeros(2, 0)), model(x))


# ----------------------------------------------------------------------------- constraints
def test_bound_output_hand_values():
    lo, hi = torch.tensor([-1.0]), torch.tensor([3.0])  # 0 sits at a quarter of the range
    raw = torch.tensor([[0.0], [math.log(3.0)], [math.atanh(0.5)], [1e6], [-1e6]])
    sig = bound_output(raw, lo, hi, "sigmoid")[:, 0].tolist()
    tanh = bound_output(raw, lo, hi, "tanh")[:, 0].tolist()
    clip = bound_output(raw, lo, hi, "clip")[:, 0].tolist()
    # sigmoid(ln 3 + logit(1/4)) = 1/2 -> -1 + 4/2 = 1; tanh(atanh(.5) + atanh(-.5)) = 0 -> 1
    assert sig == pytest.approx([0.0, 1.0, sig[2], 3.0, -1.0], abs=1e-6)
    assert tanh == pytest.approx([0.0, tanh[1], 1.0, 3.0, -1.0], abs=1e-6)
    assert clip == pytest.approx([0.0, math.log(3.0), math.atanh(0.5), 3.0, -1.0], abs=1e-6)


@pytest.mark.parametrize("mode, slope", [("clip", 1.0), ("sigmoid", bb.GRAD_FLOOR * 4),
                                         ("tanh", bb.GRAD_FLOOR * 4)])
def test_saturated_outputs_keep_a_gradient(mode, slope):
    raw = torch.tensor([[1e6], [-1e6]], requires_grad=True)
    bound_output(raw, torch.tensor([-1.0]), torch.tensor([3.0]), mode).sum().backward()
    assert raw.grad[:, 0].tolist() == pytest.approx([slope, slope])


@pytest.mark.parametrize("constrain", ["clip", "sigmoid", "tanh"])
def test_constrained_model_stays_in_bounds_and_learns_from_extremes(constrain):
    model = tiny_model(constrain=constrain)
    lo, hi = torch.tensor([-2.0, -1.0, -0.5]), torch.tensor([1.0, 3.0, 0.5])
    model.set_bounds(lo, hi)
    x = torch.randn(4, 2, 300)
    assert model(x).abs().max() == 0  # starts at the train mean through the constraint
    torch.nn.init.normal_(model.head.mlp[-1].weight, std=100.0)
    out = model(x * 1e3)
    assert ((out >= lo) & (out <= hi)).all()
    saturated = torch.isclose(out, hi, atol=1e-6) | torch.isclose(out, lo, atol=1e-6)
    assert saturated.sum() >= 6  # most outputs really sit at a bound
    out.sub(torch.zeros(3)).square().sum().backward()
    grad = model.head.mlp[-1].weight.grad
    assert (grad.abs().sum(dim=1) > 0).all()  # every target's output still learns


def test_constraint_needs_bounds_and_bounds_live_in_state_dict():
    model = tiny_model(constrain="sigmoid")
    with pytest.raises(RuntimeError, match="set_bounds"):
        model(torch.zeros(1, 2, 64))
    with pytest.raises(UserError, match="lo < hi"):
        model.set_bounds([0.0, 0.0, 0.0], [1.0, 0.0, 1.0])
    model.set_bounds([-1.0, -2.0, -3.0], [1.0, 2.0, 3.0])
    fresh = tiny_model(constrain="sigmoid")
    fresh.load_state_dict(model.state_dict())
    assert fresh.y_hi.tolist() == [1.0, 2.0, 3.0]
    assert fresh(torch.zeros(1, 2, 64)).shape == (1, 3)


# ----------------------------------------------------------------------------- freezing, groups
def sgd_step(model, x):
    opt = torch.optim.AdamW(param_groups(model, 1e-2, 1e-2, 0.1))
    model(x).sub(1.0).square().mean().backward()
    opt.step()


@pytest.mark.parametrize("modality, fusion", LAYOUTS)
def test_frozen_backbone_gets_no_gradient_and_does_not_change(modality, fusion):
    model = tiny_model(modality, fusion)
    model.freeze_backbone()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, len(MODALITY_CHANNELS[modality]), 300)
    sgd_step(model, x)
    sgd_step(model, x)  # the second step moves layers behind the zero-initialised one
    assert not any(enc.training for enc in model.encoders.modules())
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        if model.is_pretrained(name):
            assert param.grad is None and not changed, name
        elif name.startswith("head.mlp"):
            assert changed, name
    # early fusion's widened first conv is new: it trains, or PPG would be ignored
    assert model.partly_new == ({"encoders.both.first_conv.conv.weight"}
                                if fusion == "early" and modality == "both" else set())
    for name in model.partly_new:
        assert not torch.equal(dict(model.named_parameters())[name], before[name])


@pytest.mark.parametrize("use_bn", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("modality, fusion", LAYOUTS)
def test_every_trainable_parameter_gets_a_gradient_and_no_other(modality, fusion, frozen, use_bn):
    # DistributedDataParallel runs without find_unused_parameters: a trainable parameter
    # that got no gradient would stop a torchrun job; one without requires_grad costs nothing
    net1d = {**dataclasses.asdict(ARCHS["tiny"]), "use_bn": use_bn}
    model = tiny_model(modality, fusion, net1d=net1d, n_covariates=2, constrain="clip")
    model.set_bounds([-3.0] * 3, [3.0] * 3)
    if frozen:
        model.freeze_backbone()
    model.train()
    x = torch.randn(4, len(MODALITY_CHANNELS[modality]), 300)
    model(x, torch.randn(4, 2)).square().mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable == with_grad
    unused_bn = {n for n in dict(model.named_parameters()) if ".bn" in n or "first_bn" in n}
    if not use_bn:
        assert unused_bn and not unused_bn & trainable


def test_param_groups_split_backbone_head_and_decay():
    model = tiny_model(fusion="early")
    groups = {g["name"]: g for g in param_groups(model, 1e-5, 3e-4, 0.05)}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert [groups[n]["lr"] for n in sorted(groups)] == [1e-5, 1e-5, 3e-4, 3e-4]
    assert groups["backbone"]["weight_decay"] == 0.05
    assert groups["head_no_decay"]["weight_decay"] == 0
    names = {id(p): n for n, p in model.named_parameters()}
    members = {g: {names[id(p)] for p in groups[g]["params"]} for g in groups}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(len(m) for m in members.values()) == len(trainable)
    assert set().union(*members.values()) == trainable
    assert "encoders.both.first_conv.conv.weight" in members["head"]
    assert "encoders.both.first_conv.conv.bias" in members["backbone_no_decay"]
    assert "head.norm.weight" in members["head_no_decay"]
    assert not any("bn" in n for n in trainable)  # unused norms are never optimised


# ----------------------------------------------------------------------------- loading
def save(tmp_path, obj, name="pre.pth"):
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


LOAD_LAYOUTS = {
    "ecgfounder": lambda sd: {"state_dict": sd, "epoch": 0, "note": "x"},
    "model": lambda sd: {"model": sd},
    "model_state_dict": lambda sd: {"model_state_dict": sd, "optimizer": {"lr": 1}},
    "bare": lambda sd: sd,
    "module_prefix": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    "numpy_score": lambda sd: {"state_dict": sd, "val_auc": np.float64(0.9), "step": np.int64(3)},
}


@pytest.mark.parametrize("layout", sorted(LOAD_LAYOUTS))
@pytest.mark.parametrize("modality, fusion", LAYOUTS)
def test_ecgfounder_layouts_load_into_every_encoder(tmp_path, capsys, layout, modality, fusion):
    path = save(tmp_path, LOAD_LAYOUTS[layout](fixture_state()))
    model = tiny_model(modality, fusion)
    report = load_pretrained(model, path)
    expected = encoder_state()
    for name in encoder_names(modality, fusion):
        assert_encoder_holds(model.encoders[name], expected, widened=name == "both")
        enc = report["encoders"][name]
        assert (enc["loaded"], enc["missing"], enc["unexpected"], enc["mismatched"]) == \
            (len(expected), [], [], [])
    assert sorted(k.split(".")[-2] for k in report["dropped"]) == ["dense", "dense"]
    assert f"{len(expected)} loaded, 0 missing, 0 unexpected, 0 shape-mismatched" in \
        capsys.readouterr().out


def test_early_fusion_starts_as_the_pretrained_ecg_encoder(tmp_path):
    model = tiny_model(fusion="early")
    load_pretrained(model, FIXTURE, verbose=False)
    ecg = torch.from_numpy(GOLDEN["x_1001"])
    x = torch.cat([ecg, torch.randn_like(ecg)], dim=1)
    with torch.no_grad():
        features = model.encoders["both"].features(x).numpy()
    np.testing.assert_allclose(features, GOLDEN["features_1001"], atol=1e-5, rtol=0)


def joint_state():
    ecg = encoder_state()
    ppg = {k: v + 1.0 if v.is_floating_point() else v for k, v in ecg.items()}
    return ecg, ppg


@pytest.mark.parametrize("prefix", ["", "encoders."])
@pytest.mark.parametrize("modality, fusion", LAYOUTS)
def test_joint_checkpoint_loads_each_encoder_from_its_prefix(tmp_path, prefix, modality, fusion):
    ecg, ppg = joint_state()
    state = {f"{prefix}ecg.{k}": v for k, v in ecg.items()}
    state.update({f"{prefix}ppg.{k}": v for k, v in ppg.items()})
    model = tiny_model(modality, fusion)
    report = load_pretrained(model, save(tmp_path, {"state_dict": state}), verbose=False)
    sources = {"ecg": ecg, "ppg": ppg, "both": ecg}
    for name in encoder_names(modality, fusion):
        assert_encoder_holds(model.encoders[name], sources[name], widened=name == "both")
        assert report["encoders"][name]["source"] == ("ecg" if name == "both" else name)


def test_joint_checkpoint_without_ppg_fails_only_when_ppg_is_used(tmp_path):
    path = save(tmp_path, {"state_dict": {f"ecg.{k}": v for k, v in encoder_state().items()}})
    load_pretrained(tiny_model("ecg"), path, verbose=False)
    with pytest.raises(UserError, match=r"pre\.pth, encoder 'ppg': nothing to load"):
        load_pretrained(tiny_model("both", "late"), path, verbose=False)


@pytest.mark.parametrize("modality, fusion", LAYOUTS)
def test_project_checkpoint_loads_encoders_and_matching_head(tmp_path, modality, fusion):
    trained = tiny_model(modality, fusion, constrain="tanh")
    trained.set_bounds([-1.0] * 3, [1.0] * 3)
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(torch.randn_like(param))
    cols = ["sbp", "dbp", "pp"]
    path = str(tmp_path / "bp_best.pth")
    save_checkpoint(path, {"model": trained.state_dict(), "target_cols": cols,
                           "model_config": dataclasses.asdict(trained.config)})
    same = tiny_model(modality, fusion, constrain="tanh")
    report = load_pretrained(same, path, target_cols=cols, verbose=False)
    want = trained.state_dict()
    for key, value in same.state_dict().items():
        if key not in ("y_lo", "y_hi"):  # bounds belong to the new run's training set
            torch.testing.assert_close(value, want[key], rtol=0, atol=0)
    assert report["layout"] == "project" and report["head"]["loaded"] > 0
    other = tiny_model(modality, fusion)
    report = load_pretrained(other, path, target_cols=["sbp", "dbp", "mbp"], verbose=False)
    assert report["head"]["loaded"] == 0 and "target_cols differ" in report["head"]["reason"]
    assert other.head.mlp[-1].weight.abs().max() == 0


AGE = {"name": "age", "kind": "numeric", "mean": 55.0, "std": 10.0, "fill": 55.0,
       "missing_indicator": False}
SEX = {"name": "sex", "kind": "categorical", "levels": ["0", "1"], "fill": "1",
       "missing_indicator": False}
OLD = {"target_mean": [120.0, 80.0, 40.0], "target_std": [15.0, 10.0, 8.0],
       "covariates": [AGE, SEX]}


def _trained_head(tmp_path, hidden):
    """A tiny ECG model with random weights, saved as a run with the OLD statistics."""
    trained = tiny_model("ecg", n_covariates=2, head_hidden=hidden)
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(0.3 * torch.randn_like(param))
    path = str(tmp_path / "bp_best.pth")
    save_checkpoint(path, {"model": trained.state_dict(), "target_cols": ["a", "b", "c"], **OLD})
    return trained.eval(), path


def _mmhg(model, stats, x, age, sex):
    cov = torch.stack([(age - stats["covariates"][0]["mean"]) / stats["covariates"][0]["std"],
                       sex], dim=1)
    with torch.no_grad():
        out = model(x, cov)
    return out * torch.tensor(stats["target_std"]) + torch.tensor(stats["target_mean"])


@pytest.mark.parametrize("hidden", [16, 0])
def test_reused_head_is_re_expressed_in_the_new_run_statistics(tmp_path, hidden):
    trained, path = _trained_head(tmp_path, hidden)
    new = {"target_mean": [126.0, 77.0, 45.0], "target_std": [18.0, 9.0, 7.5],
           "covariates": [{**AGE, "mean": 61.0, "std": 12.5}, SEX]}
    model = tiny_model("ecg", n_covariates=2, head_hidden=hidden).eval()
    report = load_pretrained(model, path, target_cols=["a", "b", "c"], stats=new, verbose=False)
    assert report["head"]["loaded"] > 0 and "re-expressed" in report["head"]["reason"]
    torch.manual_seed(1)
    x, age = torch.randn(5, 1, 200), 40 + 40 * torch.rand(5)
    sex = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    # the same mmHg for the same person, whatever statistics each run normalised with
    torch.testing.assert_close(_mmhg(model, new, x, age, sex), _mmhg(trained, OLD, x, age, sex),
                               rtol=0, atol=1e-3)
    same = tiny_model("ecg", n_covariates=2, head_hidden=hidden)
    load_pretrained(same, path, target_cols=["a", "b", "c"], stats=OLD, verbose=False)
    for key, value in trained.state_dict().items():  # equal statistics: the head as saved
        if key not in ("y_lo", "y_hi"):  # bounds belong to the new run's training set
            torch.testing.assert_close(same.state_dict()[key], value, rtol=0, atol=1e-6)


def test_project_head_refused_when_the_covariates_differ(tmp_path):
    _, path = _trained_head(tmp_path, 16)
    for covariates, reason in (
            ([AGE, {**SEX, "name": "bmi"}], "covariates differ (file ['age', 'sex'], now ['age', 'bmi'])"),
            ([AGE, {**SEX, "levels": ["f", "m"]}], "covariate sex is encoded otherwise (levels"),
            ([{**AGE, "missing_indicator": True}, SEX], "covariate age is encoded otherwise")):
        model = tiny_model("ecg", n_covariates=2)
        report = load_pretrained(model, path, target_cols=["a", "b", "c"],
                                 stats={**OLD, "covariates": covariates}, verbose=False)
        assert report["head"]["loaded"] == 0 and reason in report["head"]["reason"]
        assert model.head.mlp[-1].weight.abs().max() == 0  # the fresh head, not a misfit


def test_project_head_skipped_when_fusion_changes_shapes(tmp_path):
    trained = tiny_model("both", "late")
    path = str(tmp_path / "bp_best.pth")
    save_checkpoint(path, {"model": trained.state_dict(), "target_cols": ["a", "b", "c"]})
    mid = tiny_model("both", "mid")
    report = load_pretrained(mid, path, target_cols=["a", "b", "c"], verbose=False)
    assert report["head"]["loaded"] == 0 and "shapes differ" in report["head"]["reason"]
    assert report["encoders"]["ppg"]["loaded"] == 157


def broken(kind):
    sd = fixture_state()
    if kind == "12-lead":
        sd["first_conv.conv.weight"] = torch.zeros(8, 12, 16)
    elif kind == "missing":
        del sd["stage_list.3.block_list.0.conv2.conv.weight"]
    elif kind == "unexpected":
        sd["stage_list.4.block_list.0.conv1.conv.weight"] = torch.zeros(1)
    elif kind == "unrelated":
        sd = {"layer1.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}
    return {"state_dict": sd}


@pytest.mark.parametrize("kind, fragment", [
    ("12-lead", r"do not fit, e\.g\. first_conv\.conv\.weight file \(8, 12, 16\)"),
    ("missing", "1 missing and 0 unexpected"),
    ("unexpected", "0 missing and 1 unexpected"),
    ("unrelated", "nothing to load"),
])
@pytest.mark.parametrize("modality, fusion", LAYOUTS)
def test_checkpoint_that_does_not_fit_is_refused(tmp_path, kind, fragment, modality, fusion):
    model = tiny_model(modality, fusion)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = save(tmp_path, broken(kind))
    with pytest.raises(UserError, match=f"checkpoint {path}.*{fragment}"):
        load_pretrained(model, path)
    for key, value in model.state_dict().items():  # nothing half-loaded
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True)


def test_other_arch_is_refused():
    with pytest.raises(UserError, match="do not fit"):
        load_pretrained(build_bp_model(dict(arch="small", modality="ecg")), FIXTURE)


@pytest.mark.parametrize("content, fragment", [
    (b"not a checkpoint at all\n", "not a readable PyTorch checkpoint"),
    ([1, 2, 3], "holds no state_dict"),
    ({"state_dict": {"note": "no tensors"}}, "holds no state_dict"),
])
def test_file_that_is_not_a_checkpoint_is_refused(tmp_path, content, fragment):
    if isinstance(content, bytes):
        path = str(tmp_path / "pre.pth")
        open(path, "wb").write(content)
    else:
        path = save(tmp_path, content)
    with pytest.raises(UserError, match=fragment):
        load_pretrained(tiny_model(), path)


def test_file_needing_unpickling_needs_the_trust_flag(tmp_path):
    path = save(tmp_path, {"state_dict": fixture_state(), "args": argparse.Namespace(lr=1)})
    with pytest.raises(UserError, match="--trust_checkpoint"):
        load_pretrained(tiny_model(), path)
    report = load_pretrained(tiny_model(), path, trust=True, verbose=False)
    assert report["encoders"]["ecg"]["loaded"] == 157

