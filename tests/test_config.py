"""The settings: declarations drive validation, the presets resolve as before, old configs load, the CLI flags
are made from the declarations. No training here."""

import argparse
import json
import pickle
import time

import numpy as np
import pytest

from dcss_plugin.app.cli import build_parser, config_overrides, main
from dcss_plugin.config import (OPTIONS, PRESETS, REMOVED_OPTIONS, DCSSConfig, config_signature, get_option,
                                preset_values, LARGE_IMAGE_SET)

FIELDS = ["n_clusters", "preset", "latent_dim", "m", "lam", "zeta", "gamma", "T1", "T2", "T2_min_steps",
          "pretrain_epochs", "pretrain_min_epochs", "phase1_epochs", "phase2_epochs", "batch_size", "lr", "phase1_lr_factor", "autoencoder",
          "mlp_hidden_dims", "head_hidden_dims", "augment", "neighbors", "balance_weight", "balance_tolerance",
          "exclude_self", "pair_reduction", "neighbor_refresh", "num_heads", "contrastive_weight",
          "neighbor_embedding_weight", "neighbor_embedding_k", "kmeans_init", "conv_channels",
          "phase2_encoder_lr_factor", "seed"]

# Today's defaults, written out (None: from the preset).
DEFAULTS = {"n_clusters": 10, "preset": "default", "latent_dim": 10, "m": None, "lam": 0.1, "zeta": 0.8, "gamma": 0.2,
            "T1": 2, "T2": 5, "T2_min_steps": None, "pretrain_epochs": None, "pretrain_min_epochs": None, "phase1_epochs": None,
            "phase2_epochs": None, "batch_size": 256, "lr": None, "phase1_lr_factor": 0.1, "autoencoder": "auto",
            "mlp_hidden_dims": None, "head_hidden_dims": [128, 128], "augment": None, "neighbors": None,
            "balance_weight": None, "balance_tolerance": None, "exclude_self": None, "pair_reduction": None,
            "neighbor_refresh": None, "num_heads": None, "contrastive_weight": None,
            "neighbor_embedding_weight": None, "neighbor_embedding_k": 10, "kmeans_init": None,
            "conv_channels": [32, 64, 128], "phase2_encoder_lr_factor": None, "seed": 0}

# What resolved() fills in, per (preset, images); everything else keeps its default.
RESOLVED = {
    ("default", True): {
        "m": 1.2, "augment": True, "neighbors": 5, "T2_min_steps": 0, "balance_weight": 5.0, "balance_tolerance": 0.0,
        "exclude_self": True, "pair_reduction": "balanced", "neighbor_refresh": 50, "num_heads": 3,
        "contrastive_weight": 1.0, "neighbor_embedding_weight": 0.0, "kmeans_init": "cosine",
        "phase2_encoder_lr_factor": 0.1, "autoencoder": "conv", "mlp_hidden_dims": [500, 500, 2000],
        "lr": 0.001, "pretrain_min_epochs": 10},
    ("default", False): {
        "m": 1.2, "augment": True, "neighbors": 5, "T2_min_steps": 400, "balance_weight": 5.0,
        "balance_tolerance": "phase1", "exclude_self": True, "pair_reduction": "balanced", "neighbor_refresh": 50,
        "num_heads": 1, "contrastive_weight": 0.0, "neighbor_embedding_weight": 1.0, "kmeans_init": "euclidean",
        "phase2_encoder_lr_factor": 0.1, "autoencoder": "mlp", "mlp_hidden_dims": [500, 500, 2000],
        "lr": 0.001, "pretrain_min_epochs": 10},
    ("paper", True): {
        "m": 1.5, "augment": False, "neighbors": 0, "T2_min_steps": 0, "balance_weight": 0.0, "balance_tolerance": 0.0,
        "exclude_self": False, "pair_reduction": "mean", "neighbor_refresh": 0, "num_heads": 1,
        "contrastive_weight": 0.0, "neighbor_embedding_weight": 0.0, "kmeans_init": "euclidean",
        "phase2_encoder_lr_factor": 1.0, "autoencoder": "mlp", "mlp_hidden_dims": [500, 500, 2000],
        "lr": 0.001, "pretrain_min_epochs": 10},
    ("paper", False): {
        "m": 1.5, "augment": False, "neighbors": 0, "T2_min_steps": 0, "balance_weight": 0.0, "balance_tolerance": 0.0,
        "exclude_self": False, "pair_reduction": "mean", "neighbor_refresh": 0, "num_heads": 1,
        "contrastive_weight": 0.0, "neighbor_embedding_weight": 0.0, "kmeans_init": "euclidean",
        "phase2_encoder_lr_factor": 1.0, "autoencoder": "mlp", "mlp_hidden_dims": [500, 500, 2000],
        "lr": 0.001, "pretrain_min_epochs": 10},
}

WRONG_TYPE = {int: [2.5, True, "3", None], float: ["x", True, [1.0], None], bool: [1, "on", None],
              str: [3, b"mean", None], tuple: ["12", (1.5,), 7, None]}


def _out_of_range(o):
    """Values of the right type that the declaration refuses."""
    bad = []
    if o.type is str or (o.type is float and o.choices):
        bad.append("nope")
    if o.type in (int, float) and o.low is not None:
        bad.append(o.type(o.low) if o.low_open else o.type(o.low) - 1)
    if o.type in (int, float) and o.high is not None:
        bad.append(o.type(o.high) + 1)
    if o.type is float:
        bad += [float("nan"), float("inf")]
    if o.type is tuple:
        bad.append((4, int(o.low) - 1))
        if o.min_len:
            bad.append(())
    return bad


def _fit_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["fit"]


def test_the_dataclass_is_the_declarations_with_todays_fields_and_defaults():
    assert [o.name for o in OPTIONS] == FIELDS
    assert DCSSConfig().to_dict() == DEFAULTS
    assert [name for name, _ in config_signature()] == FIELDS[2:]
    assert dict(config_signature()) == {k: (tuple(v) if isinstance(v, list) else v) for k, v in DEFAULTS.items()
                                        if k not in ("n_clusters", "preset")}
    for o in OPTIONS:
        assert o.check(o.default) == o.default and o.help and o.name in DCSSConfig.__doc__
        assert o.allow_none == (o.default is None)
    assert not set(REMOVED_OPTIONS) & set(FIELDS)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_wrong_type_is_a_type_error_naming_the_option(option):
    for value in WRONG_TYPE[option.type]:
        if value is None and option.allow_none:
            continue
        if option.type is float and option.choices and isinstance(value, str):
            continue  # a string is the right type there; its value is judged (below)
        with pytest.raises(TypeError) as exc:
            DCSSConfig(**{option.name: value})
        assert str(exc.value).startswith(f"{option.name} must be {option.expected()}, got {value!r} ("), exc.value


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_out_of_range_is_a_value_error_naming_the_option_and_the_fix(option):
    for value in _out_of_range(option):
        with pytest.raises(ValueError) as exc:
            DCSSConfig(**{option.name: value})
        text = str(exc.value)
        assert text.startswith(f"{option.name} must be {option.expected()}, got "), text
        assert text.endswith(f"{option.name} is {option.help}."), text


def test_messages_say_what_why_and_how():
    with pytest.raises(TypeError, match=r"^n_clusters must be an int >= 2, got 2\.7 \(float\)\. n_clusters is the "):
        DCSSConfig(n_clusters=2.7)
    with pytest.raises(ValueError, match=r"^m must be a float > 1, or None \(from the preset\), got 1\.0 \(float\)"):
        DCSSConfig(m=1.0)
    with pytest.raises(ValueError, match=r"balance_tolerance must be a float >= 0 or 'phase1'.*got 'phase2'"):
        DCSSConfig(balance_tolerance="phase2")
    with pytest.raises(ValueError, match=r"conv_channels must be a non-empty tuple of ints >= 1.*got \(8, 0\)"):
        DCSSConfig(conv_channels=(8, 0))
    with pytest.raises(ValueError, match=r"gamma must be <= zeta .*got gamma=0\.5, zeta=0\.4; lower gamma or raise"):
        DCSSConfig(gamma=0.5, zeta=0.4)
    with pytest.raises(TypeError, match="unexpected keyword argument 'neighbor_space'"):
        DCSSConfig(neighbor_space="u")


def test_accepted_values_are_stored_as_plain_python():
    cfg = DCSSConfig(n_clusters=np.int64(3), lr=1, m=np.float32(1.25), zeta=np.float64(0.9), augment=np.bool_(False),
                     mlp_hidden_dims=[np.int32(8), 4], head_hidden_dims=np.array([16]), balance_tolerance="phase1",
                     seed=np.uint32(7), conv_channels=(4,))
    assert (cfg.n_clusters, cfg.lr, cfg.m, cfg.zeta, cfg.augment, cfg.seed) == (3, 1.0, 1.25, 0.9, False, 7)
    assert type(cfg.n_clusters) is int and type(cfg.lr) is float and type(cfg.augment) is bool
    assert cfg.mlp_hidden_dims == (8, 4) and cfg.head_hidden_dims == (16,) and type(cfg.mlp_hidden_dims[0]) is int
    assert json.loads(json.dumps(cfg.to_dict()))["mlp_hidden_dims"] == [8, 4]
    cfg.lam = -1.0  # a mutable dataclass: validate() checks again
    with pytest.raises(ValueError, match="^lam must be a float >= 0"):
        cfg.validate()


def test_validation_is_fast():
    t0 = time.perf_counter()
    for _ in range(200):
        DCSSConfig(n_clusters=5, m=1.3).resolved(images=False)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("preset, images", list(RESOLVED))
def test_presets_resolve_to_todays_values(preset, images):
    cfg = DCSSConfig(n_clusters=4, preset=preset)
    expected = {**DEFAULTS, "n_clusters": 4, "preset": preset, **RESOLVED[preset, images]}
    assert cfg.resolved(images=images).to_dict() == expected
    assert cfg.to_dict()["m"] is None  # resolved() returns a copy


def test_presets_are_plain_data_and_explicit_values_win():
    assert set(PRESETS) == {"default", "paper"} == set(get_option("preset").choices)
    for preset, images in RESOLVED:
        values = preset_values(preset, images)
        for name, value in values.items():
            option = get_option(name)
            assert (option.allow_none or option.default == "auto") and option.check(value) == value
    assert DCSSConfig(m=1.3, num_heads=2).resolved(images=True).to_dict()["m"] == 1.3
    large = DCSSConfig().resolved(images=True, n_samples=LARGE_IMAGE_SET)
    assert (large.autoencoder, large.mlp_hidden_dims, large.neighbor_embedding_weight, large.contrastive_weight,
            large.num_heads) == ("mlp", (256, 256, 1024), 1.0, 0.0, 1)
    assert DCSSConfig().resolved(images=True, n_samples=LARGE_IMAGE_SET - 1).autoencoder == "conv"
    assert DCSSConfig(autoencoder="conv", mlp_hidden_dims=(8,)).resolved(True, 10 ** 5).autoencoder == "conv"
    assert DCSSConfig(preset="paper").resolved(images=True, n_samples=10 ** 5).mlp_hidden_dims == (500, 500, 2000)
    assert DCSSConfig(num_heads=2).resolved(images=True).num_heads == 2
    assert DCSSConfig(contrastive_weight=0.0).resolved(images=True).kmeans_init == "euclidean"
    assert DCSSConfig(kmeans_init="cosine").resolved(images=False).kmeans_init == "cosine"
    assert DCSSConfig(contrastive_weight=0.5, preset="paper").resolved(images=False).kmeans_init == "cosine"
    with pytest.raises(ValueError, match="^preset must be one of 'default', 'paper'"):
        preset_values("fast", images=True)


def test_to_dict_from_dict_round_trip_and_pickle():
    cfg = DCSSConfig(n_clusters=3, preset="paper", mlp_hidden_dims=(32, 16), balance_tolerance="phase1")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert DCSSConfig.from_dict(d) == cfg and DCSSConfig.from_dict(cfg.resolved().to_dict()) == cfg.resolved()
    assert pickle.loads(pickle.dumps(cfg)) == cfg


@pytest.mark.parametrize("key, value", [(k, v) for k, values in REMOVED_OPTIONS.items() for v in values])
def test_old_configs_with_removed_options_at_their_implied_value_load(key, value):
    old = {**DCSSConfig(n_clusters=3).to_dict(), key: value}
    assert DCSSConfig.from_dict(old) == DCSSConfig(n_clusters=3)


@pytest.mark.parametrize("key, value", [("mlp_linear_path", True), ("neighbor_space", "input"),
                                        ("positive_loss", "linear"), ("balance_prior", "phase1")])
def test_old_configs_with_removed_options_at_another_value_are_refused(key, value):
    with pytest.raises(ValueError, match=rf"^{key}=.*the option {key} was removed in this version"):
        DCSSConfig.from_dict({"n_clusters": 3, key: value})


def test_unknown_keys_are_refused():
    with pytest.raises(ValueError, match=r"Unknown DCSS config keys \['frobnicate'\]"):
        DCSSConfig.from_dict({"n_clusters": 3, "frobnicate": 1})


def test_every_option_has_a_fit_flag_with_its_help():
    actions = {a.dest: a for a in _fit_parser()._actions}
    own = {"n_clusters": ("--clusters", "clusters"), "preset": ("--preset", "preset"), "seed": ("--seed", "seed")}
    for o in OPTIONS:
        flag, dest = own.get(o.name, (o.cli_flag, o.name))
        assert o.cli == (o.name not in own)
        action = actions[dest]
        assert flag in action.option_strings and action.help and action.help != argparse.SUPPRESS
        assert o.help.replace("%", "%%") in action.help
        if o.cli:
            assert action.default is None
    spellings = {"pretrain_epochs": "--pretrain-epochs", "phase1_epochs": "--phase1-epochs",
                 "phase2_epochs": "--phase2-epochs", "batch_size": "--batch-size", "T1": "--T1", "T2": "--T2",
                 "T2_min_steps": "--T2-min-steps", "latent_dim": "--latent-dim", "m": "--m", "zeta": "--zeta",
                 "gamma": "--gamma", "lam": "--lam", "lr": "--lr", "kmeans_init": "--kmeans-init",
                 "num_heads": "--num-heads", "neighbor_embedding_weight": "--neighbor-embedding",
                 "neighbor_embedding_k": "--neighbor-embedding-k"}
    for name, flag in spellings.items():
        assert actions[name].option_strings == [flag]
    assert not {"neighbor_space", "mlp_linear_path"} & set(actions)


GOOD_TEXT = {int: ("7", 7), float: ("0.25", 0.25), bool: ("off", False), tuple: ("8,4", (8, 4))}


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.cli], ids=lambda o: o.name)
def test_flag_values_become_the_overrides(option):
    text, value = GOOD_TEXT.get(option.type, (None, None))
    if option.choices:
        text = value = option.choices[-1]
    if option.name in ("zeta", "gamma", "m"):
        text, value = {"m": ("1.25", 1.25)}.get(option.name, ("0.5", 0.5))
    args = _fit_parser().parse_args(["--data", "x", "--clusters", "3", "--out", "o", option.cli_flag, text])
    assert config_overrides(args) == {option.name: value}
    DCSSConfig(**config_overrides(args))


def test_no_flags_no_overrides():
    args = _fit_parser().parse_args(["--data", "x", "--clusters", "3", "--out", "o"])
    assert config_overrides(args) == {} and (args.clusters, args.preset, args.seed) == (3, "default", 0)


BAD_TEXT = {int: "2.5", float: "abc", bool: "maybe", str: "nope", tuple: "8,x"}


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_a_bad_flag_value_exits_2_naming_the_option(option, tmp_path, capsys):
    flag = {"n_clusters": "--clusters"}.get(option.name, option.cli_flag)
    base = ["fit", "--data", "x.npy", "--out", str(tmp_path / "r")]
    base += [] if option.name == "n_clusters" else ["--clusters", "3"]
    with pytest.raises(SystemExit) as exc:
        main([*base, flag, BAD_TEXT[option.type]])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and f"{option.name} must be" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
