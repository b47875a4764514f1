"""Training configs: YAML and key=value overrides onto typed dataclasses; errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from resumax import cli
from resumax.errors import ConfigError
from resumax.train.config import Config, changed_keys, load_config, to_yaml

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["digits.yaml", "digits_cnn.yaml"])
def test_shipped_configs_load_and_resolve_interpolations(name):
    config = load_config(CONFIGS / name)
    assert isinstance(config, Config)
    assert config.data.prepare == "digits"
    assert config.data.train_paths == f"{config.data.dir}/train-*.array_record"
    assert config.train.checkpoint_dir == f"{config.train.run_dir}/checkpoints"
    assert config.data.num_epochs == -1


def test_cnn_config_selects_the_cnn():
    assert load_config(CONFIGS / "digits_cnn.yaml").model.name == "cnn"
    assert load_config(CONFIGS / "digits.yaml").model.name == "mlp"


def test_overrides_take_precedence_and_are_typed():
    config = load_config(
        CONFIGS / "digits.yaml",
        [
            "train.num_steps=7",
            "model.hidden_sizes=[8,4]",
            "data.shuffle_files=false",
            "train.run_dir=/tmp/x",
            "optimizer.warmup_steps=2",
        ],
    )
    assert config.train.num_steps == 7
    assert config.model.hidden_sizes == [8, 4]
    assert config.data.shuffle_files is False
    assert config.train.checkpoint_dir == "/tmp/x/checkpoints"


def test_defaults_alone_are_valid():
    config = load_config()
    assert config.optimizer.name == "adam"
    assert config.train.num_steps > 0


def test_out_of_range_message_names_key_bound_and_value():
    with pytest.raises(ConfigError, match=r"^train\.num_steps must be > 0, got -3$"):
        load_config(CONFIGS / "digits.yaml", ["train.num_steps=-3"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.num_step=5", "train.num_step"),
        ("trian.num_steps=5", "trian"),
        ("train.num_steps=abc", "train.num_steps"),
        ("train.num_steps=1.5", "train.num_steps"),
        ("data.shuffle_files=maybe", "data.shuffle_files"),
        ("model.hidden_sizes=[a]", "model.hidden_sizes"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.prefetch=-1", "data.prefetch"),
        ("data.num_epochs=0", "data.num_epochs"),
        ("data.num_epochs=-2", "data.num_epochs"),
        ("data.seed=-1", "data.seed"),
        ("data.prepare=mnist", "data.prepare"),
        ("model.name=rnn", "model.name"),
        ("model.name=transformer", "data.weights"),
        ("model.dropout=1.0", "model.dropout"),
        ("model.hidden_sizes=[0]", "model.hidden_sizes"),
        ("optimizer.name=not_an_optimizer", "optimizer.name"),
        ("optimizer.name=chain", "optimizer.name"),
        ("optimizer.learning_rate=0", "optimizer.learning_rate"),
        ("optimizer.schedule=linear", "optimizer.schedule"),
        ("optimizer.warmup_steps=5000", "optimizer.warmup_steps"),
        ("optimizer.weight_decay=-0.1", "optimizer.weight_decay"),
        ("train.log_every=0", "train.log_every"),
        ("train.checkpoint_every=-1", "train.checkpoint_every"),
        ("train.max_to_keep=0", "train.max_to_keep"),
        ("train.seed=-5", "train.seed"),
        ("train.run_dir=", "train.run_dir"),
        ("train.num_processes=0", "train.num_processes"),
        ("train.process_id=-1", "train.process_id"),
        ("train.process_id=abc", "train.process_id"),
    ],
)
def test_bad_override_raises_config_error_naming_the_key(override, key):
    with pytest.raises(ConfigError) as raised:
        load_config(CONFIGS / "digits.yaml", [override])
    assert str(raised.value).startswith(key), str(raised.value)


def test_process_id_must_be_below_the_process_count():
    with pytest.raises(ConfigError, match=r"^train\.process_id must be in \[0, "):
        load_config(CONFIGS / "digits.yaml", ["train.num_processes=2", "train.process_id=2"])


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match="train.num_steps.*key=value"):
        load_config(CONFIGS / "digits.yaml", ["train.num_steps"])


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  num_steps: 10\n  chekpoint_every: 5\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert message.startswith("train.chekpoint_every")
    assert str(path) in message


def test_wrong_type_in_yaml_names_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  batch_size: [32]\n")
    with pytest.raises(ConfigError, match=r"^data\.batch_size"):
        load_config(path)


def test_missing_and_malformed_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml.*does not exist"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml.*not valid YAML"):
        load_config(broken)


def test_yaml_round_trip_and_changed_keys(tmp_path):
    config = load_config(CONFIGS / "digits.yaml", ["train.seed=3"])
    path = tmp_path / "saved.yaml"
    path.write_text(to_yaml(config))
    reloaded = load_config(path)
    assert reloaded == config
    assert changed_keys(config, reloaded) == []
    other = load_config(path, ["train.num_steps=1000", "data.seed=1"])
    assert changed_keys(config, other) == ["data.seed", "train.num_steps"]


def test_cli_reports_config_error_and_exits_2(capsys):
    status = cli.main(["train", "--config", str(CONFIGS / "digits.yaml"), "train.num_steps=-3"])
    assert status == 2
    assert capsys.readouterr().err.strip() == (
        "resumax train: ConfigError: train.num_steps must be > 0, got -3"
    )
