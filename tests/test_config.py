import pytest

from strategies.registry import build_strategy
from task.config import ConfigError, RunConfig, config_to_dict, parse_run_config
from task.config_values import FrozenMap, parse_client_delay, parse_node_weights


def test_defaults_parse_and_are_frozen():
    # Execute
    config = parse_run_config({})

    # Assert
    assert config == RunConfig()
    assert config.dataset == "digits" and config.strategy == "fedavg"
    with pytest.raises(AttributeError):
        config.dataset = "mnist"  # type: ignore[misc]


def test_values_are_coerced_from_run_config_types():
    # Execute
    config = parse_run_config(
        {"num-server-rounds": 3, "lr": 1, "resume": "true", "run-name": "x", "seed": 7.0}
    )

    # Assert
    assert config.num_server_rounds == 3 and isinstance(config.lr, float)
    assert config.resume is True and config.seed == 7


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("dataset", "imagenet", "digits, mnist, fashion-mnist, cifar10"),
        ("model", "vgg", "simple-cnn, resnet18, mobilenet-v2"),
        ("partitioner", "random", "iid, dirichlet, pathological, shard"),
        ("device", "tpu", "auto, cpu, mps, cuda, cuda:N"),
        ("num-server-rounds", 0, "num-server-rounds must be >= 1"),
        ("num-server-rounds", -3, "num-server-rounds must be >= 1"),
        ("fraction-train", 1.5, "fraction-train must be in (0, 1]"),
        ("fraction-train", 0.0, "fraction-train must be in (0, 1]"),
        ("clip-norm", 0.0, "clip-norm must be > 0"),
        ("num-server-rounds", "five", "must be an integer"),
        ("lr", float("nan"), "lr must be finite"),
        ("runs-dir", "relative/path", "runs-dir must be an absolute path"),
        ("node-weights", "0:2", "node-weights entry '0:2' is malformed"),
    ],
)
def test_bad_values_are_refused_with_the_fix_named(key, value, named):
    # Execute / Assert
    with pytest.raises(ConfigError) as error:
        parse_run_config({key: value})
    assert named in str(error.value)


def test_resume_needs_a_run_name():
    with pytest.raises(ConfigError, match="resume=true needs run-name"):
        parse_run_config({"resume": True})


def test_unknown_strategy_lists_valid_names():
    # Prepare
    config = parse_run_config({"strategy": "fedsgd"})

    # Execute / Assert
    with pytest.raises(ConfigError) as error:
        build_strategy(config)
    assert "fedavg" in str(error.value) and "clipped" in str(error.value)


def test_node_weights_parse():
    assert parse_node_weights("0=2.0, 3=0.5") == {0: 2.0, 3: 0.5}
    assert parse_node_weights("") == {}
    with pytest.raises(ConfigError):
        parse_node_weights("1=-1")


def test_structured_keys_are_parsed_once_and_stored_as_given():
    # Prepare
    given = {
        "node-weights": "0=2.0, 3=0.5",
        "faults": "1=nan",
        "byzantine-partitions": "2, 0",
        "hostile": "4",
        "client-delay": "*=0.5, 3=2.5",
    }

    # Execute
    config = parse_run_config(given)
    stored = config_to_dict(config)

    # Assert: typed fields, the user's text in the stored config, still hashable
    assert config.node_weights == {0: 2.0, 3: 0.5} and config.faults == {1: "nan"}
    assert config.byzantine_partitions == {0, 2} and config.hostile == {4}
    assert config.client_delay.seconds == {3: 2.5} and config.client_delay.default_s == 0.5
    assert {key: stored[key] for key in given} == given
    assert parse_run_config(stored) == config
    assert hash(parse_run_config(stored)) == hash(config)


def test_structured_values_built_by_hand_are_stored_as_their_text():
    # Prepare
    config = RunConfig(
        node_weights=FrozenMap({0: 2.0}),
        faults=FrozenMap({1: "raise"}),
        byzantine_partitions=frozenset({2, 0}),
        client_delay=parse_client_delay("lognormal:1"),
    )

    # Execute
    stored = config_to_dict(config)

    # Assert
    assert stored["node-weights"] == "0=2.0" and stored["faults"] == "1=raise"
    assert stored["byzantine-partitions"] == "0,2" and stored["client-delay"] == "lognormal:1.0"
    assert parse_run_config(stored) == config
    assert config_to_dict(RunConfig())["node-weights"] == ""


def test_config_round_trips_through_its_dict(tmp_path):
    # Prepare
    config = parse_run_config({"runs-dir": str(tmp_path), "dataset": "mnist"})

    # Execute
    again = parse_run_config(config_to_dict(config))

    # Assert
    assert again == config
    assert config.resolved_runs_dir == tmp_path


def test_pyproject_defaults_match_the_dataclass():
    # Prepare: the app's [tool.flwr.app.config] is what `flwr run` passes by default
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]

    # Execute
    config = parse_run_config(app_config)

    # Assert: every key is known, and the defaults agree
    assert config.extra == {}
    assert config == RunConfig()


def test_training_keys_left_auto_take_the_datasets_defaults():
    # Execute: pyproject's "auto" and an absent key mean the same
    fashion = parse_run_config({"dataset": "fashion-mnist", "lr": "auto"})
    digits = parse_run_config({"dataset": "digits", "local-epochs": "auto"})

    # Assert
    assert (fashion.local_epochs, fashion.batch_size, fashion.lr, fashion.momentum) == (
        1,
        16,
        0.01,
        0.9,
    )
    assert (digits.local_epochs, digits.lr) == (5, 0.05)
    assert fashion.dataset_defaults == ("local-epochs", "batch-size", "lr", "momentum")
    assert fashion.training_summary == (
        "local-epochs=1 batch-size=16 lr=0.01 momentum=0.9 "
        "(fashion-mnist defaults: local-epochs, batch-size, lr, momentum)"
    )


def test_an_explicit_training_value_wins_over_the_datasets_default():
    # Execute: momentum 0 (plain SGD) is a real value, not "unset"
    config = parse_run_config({"dataset": "fashion-mnist", "lr": 0.1, "momentum": 0})

    # Assert
    assert config.lr == 0.1 and config.momentum == 0.0
    assert config.local_epochs == 1
    assert config.dataset_defaults == ("local-epochs", "batch-size")
    assert "(fashion-mnist defaults: local-epochs, batch-size)" in config.training_summary


def test_every_dataset_has_training_defaults_that_validate():
    from task.config import TRAINING_DEFAULTS
    from task.names import DATASET_NAMES

    for dataset in DATASET_NAMES:
        config = parse_run_config({"dataset": dataset})
        assert config.lr == TRAINING_DEFAULTS[dataset]["lr"]


def test_a_bad_training_value_is_still_refused():
    with pytest.raises(ConfigError, match="lr must be a number"):
        parse_run_config({"lr": "fast"})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("fraction-evaluate", 1.5, "fraction-evaluate must be in [0, 1] (0 = no federated"),
        ("fraction-evaluate", -0.1, "fraction-evaluate must be in [0, 1]"),
        ("min-evaluate-nodes", 0, "min-evaluate-nodes must be >= 1, got 0"),
        ("evaluate-every", 0, "evaluate-every must be >= 1 (rounds between"),
        ("local-test-fraction", 1.0, "local-test-fraction must be in [0, 1), got 1.0"),
    ],
)
def test_evaluation_keys_out_of_range_are_refused_with_the_range(key, value, message):
    with pytest.raises(ConfigError) as refused:
        parse_run_config({key: value})
    assert message in str(refused.value)


def test_evaluate_every_k_rounds_and_at_the_last_round():
    # Execute
    config = parse_run_config({"evaluate-every": 3, "num-server-rounds": 7})

    # Assert
    assert [r for r in range(1, 8) if config.evaluates_in_round(r)] == [3, 6, 7]


def test_no_federated_evaluation_without_local_test_data_or_with_fraction_zero():
    # Execute
    all_train = parse_run_config({"local-test-fraction": 0})
    none_asked = parse_run_config({"fraction-evaluate": 0.0})
    default = parse_run_config({})

    # Assert
    assert not all_train.federated_evaluation and not all_train.evaluates_in_round(1)
    assert not none_asked.federated_evaluation
    assert default.federated_evaluation and default.evaluates_in_round(1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0=1e", "weight 1e for partition 0 must be a finite number in [0, 1e+06]"),
        ("0=--", "must be a finite number in [0, 1e+06]"),
        ("0=2e6", "weight 2e6 for partition 0 must be a finite number in [0, 1e+06]"),
        ("99999999999=1", "partition 99999999999 must be in [0, 2^31)"),
    ],
)
def test_node_weights_out_of_the_operator_bounds_are_one_config_error(text, message):
    with pytest.raises(ConfigError) as refused:
        parse_node_weights(text)
    assert message in str(refused.value)
