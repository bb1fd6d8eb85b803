"""TrainConfig layering (defaults < preset < file < flags), files, validation messages."""

from __future__ import annotations

import json

import pytest

from adabatch.train.config import (
    PRESETS,
    ConfigError,
    TrainConfig,
    build_config,
    load_config_file,
    validate,
)


def test_defaults_are_the_embedded_run():
    cfg = validate(build_config())
    assert (cfg.dataset, cfg.model, cfg.optimizer, cfg.batch_test) == (
        "digits",
        "mlp",
        "adagradnorm",
        "norm",
    )
    assert cfg.budget() == ("epochs", TrainConfig.DEFAULT_EPOCHS)
    assert cfg.effective_micro_batch() is None
    assert cfg.optimizer_hparams() == {}  # the registry's defaults


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_set_the_paper_pairings(preset):
    cfg = build_config({"preset": preset})
    assert cfg.optimizer == PRESETS[preset]["optimizer"]
    assert cfg.batch_test == PRESETS[preset]["batch_test"]
    assert (cfg.optimizer, cfg.batch_test) in {("adagrad", "coord"), ("adagradnorm", "norm")}


def test_optimizer_hparams_only_what_was_given():
    cfg = build_config({"optimizer": "adam", "lr": 0.01, "betas": [0.8, 0.9],
                        "optimizer_options": {"amsgrad": True}})
    assert cfg.optimizer_hparams() == {"lr": 0.01, "betas": (0.8, 0.9), "amsgrad": True}


def test_toml_and_yaml_files_with_flags_overriding(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text(
        'optimizer = "adabelief"\nlr = 0.003\nbetas = [0.8, 0.99]\n'
        'initial-batch = 32\nepochs = 2\n[data_options]\nkind = "logistic"\n'
    )
    yaml = tmp_path / "c.yaml"
    yaml.write_text(
        "optimizer: adabelief\nlr: 0.003\nbetas: [0.8, 0.99]\n"
        "initial_batch: 32\nepochs: 2\ndata_options: {kind: logistic}\n"
    )
    for path in (toml, yaml):
        assert load_config_file(path)["optimizer"] == "adabelief"
        cfg = build_config({"lr": 0.1, "steps": 7}, path)
        assert cfg.optimizer == "adabelief" and cfg.betas == (0.8, 0.99)
        assert cfg.initial_batch == 32 and cfg.data_options == {"kind": "logistic"}
        assert cfg.lr == 0.1  # the flag wins
        assert cfg.budget() == ("steps", 7)  # a flag's budget replaces the file's
        assert cfg.epochs is None
        assert cfg.config == str(path)


def test_to_dict_round_trip():
    cfg = build_config({"betas": (0.5, 0.6), "model_options": {"hidden": [8]}, "steps": 3})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_dict(d) == cfg


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        ({"max_batch": 8, "initial_batch": 16}, r"--max-batch \(8\) must be >= --initial-batch"),
        ({"micro_batch": 5}, r"--initial-batch \(16\) must be a multiple of --micro-batch \(5\)"),
        (
            {"micro_batch": 16, "max_batch": 40},
            r"--max-batch \(40\) must be a multiple of --micro-batch \(16\)",
        ),
        (
            {"estimator": "micro-batch", "micro_batch": 16},
            r"--estimator micro-batch needs at least 2 micro-batches per step",
        ),
        ({"batch_test": "norm", "batch_schedule": "linear"}, r"are exclusive"),
        ({"batch_test": "bogus"}, r"--batch-test must be one of none, norm, ip, aip, coord"),
        ({"eta": -1.0}, r"--eta must be > 0, got -1.0"),
        ({"lr_schedule": "step"}, r"--lr-schedule must be one of constant, cosine"),
        ({"coord_reduce": "quantile"}, r"--coord-reduce quantile needs --coord-q"),
        ({"data_dir": "/nonexistent/adabatch"}, r"--data-dir: directory not found"),
        ({"micro_batch": 16, "initial_batch": 8}, r"--initial-batch \(8\) must be a multiple"),
        ({"resume": "/nonexistent/run"}, r"--resume: run directory not found"),
        ({"device": "tpu"}, r"--device must be auto, cpu, cuda or cuda:N"),
        ({"min_lr_ratio": 2.0}, r"--min-lr-ratio must be in \[0, 1\]"),
        ({"epochs": 1e308}, r"--epochs must be <= 1e\+09"),
        ({"seed": 2**63}, r"--seed must be in \[0, 2\*\*63 - 1\], got 9223372036854775808"),
        ({"seed": -1}, r"--seed must be in \[0, 2\*\*63 - 1\]"),
        ({"steps": 2**63}, r"--steps must be < 2\*\*63"),
        ({"optimizer_options": {"lr": "abc"}}, r"--opt-option lr: expected a number, got 'abc'"),
        ({"optimizer_options": {"maximize": "False!"}}, r"--opt-option maximize: expected true"),
        ({"optimizer_options": {"maximize": 2}}, r"--opt-option maximize: expected true"),
        ({"model_options": {"hidden": "abc"}}, r"--model-option hidden: expected an integer"),
        ({"dataset": "cifar10", "data_options": {"augment": "maybe"}},
         r"--data-option augment: expected true or false"),
        ({"dataset": "synthetic", "data_options": {"kind": 3}},
         r"--data-option kind: expected a string, got 3"),
    ],
)
def test_validation_messages(flags, match):
    with pytest.raises(ConfigError, match=match):
        validate(build_config(flags))


@pytest.mark.parametrize("spelling", ["false", "False", "FALSE", "no", "No", "0", 0, False])
def test_boolean_options_false_spellings(spelling):
    cfg = validate(build_config({"optimizer": "adam", "optimizer_options": {"maximize": spelling},
                                 "dataset": "cifar10", "data_options": {"augment": spelling}}))
    assert cfg.optimizer_options["maximize"] is False
    assert cfg.data_options["augment"] is False


@pytest.mark.parametrize("spelling", ["true", "True", "TRUE", "yes", "YES", "1", 1, True])
def test_boolean_options_true_spellings(spelling):
    cfg = validate(build_config({"optimizer_options": {"maximize": spelling}}))
    assert cfg.optimizer_options["maximize"] is True


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_options_from_a_config_file_are_typed_too(tmp_path, suffix):
    """The same conversion for options from --config as from flags."""
    path = tmp_path / f"c{suffix}"
    if suffix == ".toml":
        path.write_text('optimizer = "adam"\n[optimizer_options]\namsgrad = "no"\n'
                        'eps = "1e-6"\n[model_options]\nhidden = 32\n')
    else:
        path.write_text("optimizer: adam\noptimizer_options: {amsgrad: 'no', eps: '1e-6'}\n"
                        "model_options: {hidden: 32}\n")
    cfg = validate(build_config({}, path))
    assert cfg.optimizer_options == {"amsgrad": False, "eps": 1e-6}
    assert cfg.optimizer_options["amsgrad"] is False
    assert cfg.model_options == {"hidden": 32}
    path.write_text(path.read_text().replace("32", "'wide'"))
    with pytest.raises(ConfigError, match=r"--model-option hidden: expected an integer"):
        validate(build_config({}, path))


def test_options_of_an_untyped_hyperparameter_use_the_flag_type():
    """adagrad's b0 is not a keyword of torch.optim.Adagrad: it takes --b0's type."""
    cfg = validate(build_config({"optimizer": "adagrad", "optimizer_options": {"b0": "0.5"}}))
    assert cfg.optimizer_options == {"b0": 0.5}


def test_binary_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81" * 64)
    with pytest.raises(ConfigError, match=r"not a text file"):
        build_config({}, path)


def test_budget_given_twice_in_one_layer(tmp_path):
    with pytest.raises(ConfigError, match=r"give the budget once: --epochs and --steps"):
        build_config({"epochs": 1, "steps": 3})
    path = tmp_path / "c.yaml"
    path.write_text("samples: 100\nsteps: 3\n")
    with pytest.raises(ConfigError, match=r"give the budget once: --samples and --steps"):
        build_config({}, path)


@pytest.mark.parametrize(
    ("content", "suffix", "match"),
    [
        ("bogus_key = 1\n", ".toml", r"unknown key 'bogus_key'"),
        ("lr = 'fast'\n", ".toml", r"--lr must be a number, got 'fast'"),
        ("initial_batch = 2.5\n", ".toml", r"--initial-batch must be an integer"),
        ("lr = [\n", ".toml", r"invalid TOML"),
        ("lr: [1,\n", ".yaml", r"invalid YAML"),
        ("- 1\n- 2\n", ".yaml", r"must be a table/mapping"),
        ("betas = [0.9]\n", ".toml", r"--betas must be two numbers"),
        ("lr = 1\n", ".json", r"must end in .toml, .yaml or .yml"),
    ],
)
def test_bad_config_files(tmp_path, content, suffix, match):
    path = tmp_path / f"c{suffix}"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        build_config({}, path)


def test_missing_file_and_unknown_preset(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found"):
        build_config({}, tmp_path / "none.toml")
    with pytest.raises(ConfigError, match=r"unknown preset 'adam'"):
        build_config({"preset": "adam"})


def test_micro_batch_default_for_micro_batch_estimator():
    cfg = validate(build_config({"estimator": "micro-batch", "initial_batch": 16, "max_batch": 64}))
    assert cfg.effective_micro_batch() == 8
