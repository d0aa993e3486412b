"""Per-model config: loading, validation messages, round trip, and the check against the graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from models.config import (
    DynamicBatching,
    ModelConfig,
    VersionPolicy,
    load_config,
    parse_config,
    resolve_metadata,
)
from protocol.errors import ConfigError
from protocol.schema import ModelMetadata, TensorSpec


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def parse(data: dict[str, Any]) -> ModelConfig:
    return parse_config(data, "test")


# (config.yaml, dotted key, the bad value as the message shows it)
BAD_CONFIGS = [
    ("max_batch_size: -1", "max_batch_size", "-1"),
    ("max_batch_size: true", "max_batch_size", "True"),
    ("max_batch_size: 4.5", "max_batch_size", "4.5"),
    ("max_batch_size: '8'", "max_batch_size", "'8'"),
    ("max_batch: 8", "max_batch", "max_batch_size"),
    ("dynamic_batching: [1]", "dynamic_batching", "[1]"),
    ("dynamic_batching: {max_delay_ms: 1}", "dynamic_batching.max_delay_ms", "max_queue_delay_ms"),
    ("dynamic_batching: {max_queue_delay_ms: -1}", "dynamic_batching.max_queue_delay_ms", "-1"),
    ("dynamic_batching: {max_queue_delay_ms: .inf}", "dynamic_batching.max_queue_delay_ms", "inf"),
    ("dynamic_batching: {max_queue_delay_ms: fast}", "dynamic_batching.max_queue_delay_ms", "fast"),
    ("dynamic_batching: {max_queue_delay_ms: no}", "dynamic_batching.max_queue_delay_ms", "False"),
    ("dynamic_batching: {preferred_batch_sizes: 8}", "dynamic_batching.preferred_batch_sizes", "8"),
    (
        "dynamic_batching: {preferred_batch_sizes: [4, 0]}",
        "dynamic_batching.preferred_batch_sizes[1]",
        "0",
    ),
    (
        "max_batch_size: 8\ndynamic_batching: {preferred_batch_sizes: [4, 16]}",
        "dynamic_batching.preferred_batch_sizes",
        "[4, 16]",
    ),
    (
        "max_batch_size: 0\ndynamic_batching: {preferred_batch_sizes: [1]}",
        "dynamic_batching.preferred_batch_sizes",
        "[1]",
    ),
    ("dynamic_batching: {max_queue_size: 0}", "dynamic_batching.max_queue_size", "0"),
    ("dynamic_batching: {max_queue_size: true}", "dynamic_batching.max_queue_size", "True"),
    ("dynamic_batching: {default_timeout_ms: -5}", "dynamic_batching.default_timeout_ms", "-5"),
    ("dynamic_batching: {priority_levels: 0}", "dynamic_batching.priority_levels", "0"),
    (
        "dynamic_batching: {priority_levels: 3, default_priority_level: 4}",
        "dynamic_batching.default_priority_level",
        "4",
    ),
    (
        "dynamic_batching: {default_priority_level: 0}",
        "dynamic_batching.default_priority_level",
        "0",
    ),
    ("version_policy: latest", "version_policy", "'latest'"),
    ("version_policy: {newest: 1}", "version_policy.newest", "latest, all, specific"),
    ("version_policy: {latest: 1, all: true}", "version_policy", "'all': True"),
    ("version_policy: {}", "version_policy", "{}"),
    ("version_policy: {latest: 0}", "version_policy.latest", "0"),
    ("version_policy: {all: false}", "version_policy.all", "False"),
    ("version_policy: {specific: []}", "version_policy.specific", "[]"),
    ("version_policy: {specific: 2}", "version_policy.specific", "2"),
    ("version_policy: {specific: [1, -3]}", "version_policy.specific[1]", "-3"),
    ("instances: 0", "instances", "0"),
    ("instances: yes", "instances", "True"),
    ("intra_op_threads: -1", "intra_op_threads", "-1"),
    ("inter_op_threads: 1.5", "inter_op_threads", "1.5"),
    ("device: gpu", "device", "'gpu'"),
    ("min_batch_time_ms: -1", "min_batch_time_ms", "-1"),
    ("min_batch_time_ms: .inf", "min_batch_time_ms", "inf"),
    ("device: [cpu]", "device", "['cpu']"),
    ("inputs: {name: x}", "inputs", "{'name': 'x'}"),
    ("inputs: [x]", "inputs[0]", "'x'"),
    ("inputs: [{name: x, datatype: FP32}]", "inputs[0]", "shape"),
    ("inputs: [{name: x, datatype: FLOAT32, shape: [-1]}]", "inputs[0].datatype", "'FLOAT32'"),
    ("inputs: [{name: x, datatype: [FP32], shape: [-1]}]", "inputs[0].datatype", "['FP32']"),
    ("inputs: [{name: x, datatype: FP32, shape: [-1, 0]}]", "inputs[0].shape", "[-1, 0]"),
    ("inputs: [{name: x, datatype: FP32, shape: [-2]}]", "inputs[0].shape", "[-2]"),
    ("inputs: [{name: x, datatype: FP32, shape: [true]}]", "inputs[0].shape", "[True]"),
    ("inputs: [{name: x, datatype: FP32, shape: -1}]", "inputs[0].shape", "-1"),
    ("outputs: [{name: '', datatype: FP32, shape: [-1]}]", "outputs[0].name", "''"),
    ("outputs: [{name: 7, datatype: FP32, shape: [-1]}]", "outputs[0].name", "7"),
    (
        "outputs: [{name: y, datatype: FP32, shape: [-1]}, {name: y, datatype: FP32, shape: [1]}]",
        "outputs[1].name",
        "'y'",
    ),
    ("outputs: [{name: y, datatype: FP32, shape: [1], dims: [1]}]", "outputs[0].dims", "shape"),
]


@pytest.mark.parametrize(("text", "key", "bad"), BAD_CONFIGS)
def test_an_invalid_config_names_the_file_key_and_value(
    tmp_path: Path, text: str, key: str, bad: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.message.startswith(f"{path}: {key}: ")
    assert bad in caught.value.message.removeprefix(f"{path}: {key}: ")
    assert caught.value.key == key


def test_a_config_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r": must be a mapping, got \[1, 2\]$") as caught:
        load_config(path)
    assert caught.value.where == str(path)


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "max_batch_size: 8\ndevice: [cpu\n")
    with pytest.raises(ConfigError, match="invalid YAML at line 3") as caught:
        load_config(path)
    assert caught.value.message.startswith(f"{path}: invalid YAML")


def test_a_missing_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path / "config.yaml") == ModelConfig()


def test_an_empty_or_comment_only_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == ModelConfig()
    assert load_config(write(tmp_path, "# nothing to change\n")) == ModelConfig()


def test_defaults() -> None:
    config = parse({})
    assert config.max_batch_size is None
    assert config.dynamic_batching == DynamicBatching(
        max_queue_delay_ms=0.0,
        preferred_batch_sizes=(),
        max_queue_size=4096,
        default_timeout_ms=0.0,
        priority_levels=1,
        default_priority_level=1,
    )
    assert config.version_policy == VersionPolicy("latest", latest=1)
    assert (config.instances, config.intra_op_threads, config.inter_op_threads) == (1, 1, 1)
    assert config.device == "cpu"
    assert config.inputs == config.outputs == ()


@pytest.mark.parametrize(("levels", "default_level"), [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)])
def test_the_default_priority_level_is_the_middle_one(levels: int, default_level: int) -> None:
    batching = parse({"dynamic_batching": {"priority_levels": levels}}).dynamic_batching
    assert batching.default_priority_level == default_level


def test_lists_of_versions_and_sizes_are_sorted_and_deduplicated() -> None:
    config = parse(
        {
            "dynamic_batching": {"preferred_batch_sizes": [8, 2, 8]},
            "version_policy": {"specific": [3, 1, 3]},
        }
    )
    assert config.dynamic_batching.preferred_batch_sizes == (2, 8)
    assert config.version_policy == VersionPolicy("specific", versions=(1, 3))


def test_integer_milliseconds_are_accepted() -> None:
    batching = parse({"dynamic_batching": {"max_queue_delay_ms": 2}}).dynamic_batching
    assert batching.max_queue_delay_ms == 2.0


def test_the_where_of_a_load_request_starts_its_messages() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"instances": 0}, "load request for model 'm'")
    assert caught.value.message == (
        "load request for model 'm': instances: must be an integer >= 1, got 0"
    )


FULL_CONFIG = ModelConfig(
    max_batch_size=16,
    dynamic_batching=DynamicBatching(
        max_queue_delay_ms=1.5,
        preferred_batch_sizes=(4, 8),
        max_queue_size=10,
        default_timeout_ms=250.0,
        priority_levels=3,
        default_priority_level=3,
    ),
    version_policy=VersionPolicy("specific", versions=(1, 3)),
    instances=2,
    intra_op_threads=0,
    inter_op_threads=4,
    device="auto",
    min_batch_time_ms=2.5,
    inputs=(TensorSpec("input", "FP32", (-1, 64)),),
    outputs=(TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 10))),
)


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(),
        FULL_CONFIG,
        ModelConfig(max_batch_size=0, version_policy=VersionPolicy("all")),
        ModelConfig(version_policy=VersionPolicy("latest", latest=3)),
    ],
)
def test_to_json_round_trips_through_parse_config(tmp_path: Path, config: ModelConfig) -> None:
    assert parse(config.to_json()) == config
    # And through a YAML file, as a load request's config could be saved.
    assert load_config(write(tmp_path, yaml.safe_dump(config.to_json()))) == config


@pytest.mark.parametrize(
    ("policy", "available", "selected"),
    [
        (VersionPolicy("latest"), [1, 2, 3], [3]),
        (VersionPolicy("latest", latest=2), [3, 1, 2], [2, 3]),
        (VersionPolicy("latest", latest=5), [1, 2], [1, 2]),
        (VersionPolicy("all"), [2, 1, 10], [1, 2, 10]),
        (VersionPolicy("specific", versions=(1, 3)), [1, 2, 3], [1, 3]),
        (VersionPolicy("specific", versions=(1, 4)), [1, 2, 3], [1]),
        (VersionPolicy("latest"), [], []),
    ],
)
def test_version_policy_select(
    policy: VersionPolicy, available: list[int], selected: list[int]
) -> None:
    assert policy.select(available) == selected


GRAPH_INPUTS = (TensorSpec("input", "FP32", (-1, 64)),)
GRAPH_OUTPUTS = (TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 10)))


def resolve(
    config: dict[str, Any],
    inputs: tuple[TensorSpec, ...] = GRAPH_INPUTS,
    outputs: tuple[TensorSpec, ...] = GRAPH_OUTPUTS,
) -> ModelMetadata:
    return resolve_metadata("m", "1", parse(config), inputs, outputs, "repo/m/config.yaml")


def test_metadata_takes_the_graph_specs_and_derives_batching() -> None:
    metadata = resolve({})
    assert metadata.name == "m"
    assert metadata.version == "1"
    assert metadata.platform == "onnxruntime_onnx"
    assert metadata.inputs == GRAPH_INPUTS
    assert metadata.outputs == GRAPH_OUTPUTS
    assert metadata.max_batch_size == 32


def test_a_fixed_first_dimension_means_no_batching_by_default() -> None:
    image = (TensorSpec("image", "FP32", (1, 3, 224, 224)),)
    assert resolve({}, inputs=image).max_batch_size == 0


def test_a_scalar_output_means_no_batching_by_default() -> None:
    assert resolve({}, outputs=(TensorSpec("score", "FP32", ()),)).max_batch_size == 0


def test_an_explicit_max_batch_size_wins() -> None:
    assert resolve({"max_batch_size": 8}).max_batch_size == 8
    metadata = resolve({"max_batch_size": 0})
    assert metadata.max_batch_size == 0
    assert metadata.inputs == GRAPH_INPUTS


def test_declarations_narrow_variable_dimensions_in_graph_order() -> None:
    graph_inputs = (TensorSpec("a", "FP32", (-1, -1)), TensorSpec("b", "INT64", (-1, 3)))
    metadata = resolve(
        {
            "inputs": [
                {"name": "b", "datatype": "INT64", "shape": [-1, 3]},
                {"name": "a", "datatype": "FP32", "shape": [-1, 16]},
            ]
        },
        inputs=graph_inputs,
    )
    assert metadata.inputs == (TensorSpec("a", "FP32", (-1, 16)), TensorSpec("b", "INT64", (-1, 3)))
    assert metadata.max_batch_size == 32


def test_a_declared_fixed_first_dimension_turns_derived_batching_off() -> None:
    metadata = resolve({"inputs": [{"name": "input", "datatype": "FP32", "shape": [8, 64]}]})
    assert metadata.inputs == (TensorSpec("input", "FP32", (8, 64)),)
    assert metadata.max_batch_size == 0


@pytest.mark.parametrize(
    ("config", "key", "problem"),
    [
        (
            {"inputs": [{"name": "foo", "datatype": "FP32", "shape": [-1, 64]}]},
            "inputs[0].name",
            "input 'foo' is not in the graph; the graph has 'input'",
        ),
        (
            {"outputs": [{"name": "labels", "datatype": "INT64", "shape": [-1]}]},
            "outputs[0].name",
            "output 'labels' is not in the graph; the graph has 'label', 'probabilities'",
        ),
        (
            {"inputs": [{"name": "input", "datatype": "FP64", "shape": [-1, 64]}]},
            "inputs[0].datatype",
            "'FP64' does not match the graph's 'FP32' for input 'input'",
        ),
        (
            {"outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 12]}]},
            "outputs[0].shape",
            "[-1, 12] does not fit the graph's [-1, 10] for output 'probabilities'",
        ),
        (
            {"outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, -1]}]},
            "outputs[0].shape",
            "[-1, -1] does not fit the graph's [-1, 10]",
        ),
        (
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 8, 8]}]},
            "inputs[0].shape",
            "[-1, 8, 8] does not fit the graph's [-1, 64]",
        ),
        (
            {
                "max_batch_size": 8,
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [8, 64]}],
            },
            "max_batch_size",
            "8 needs a variable first dimension on every input and output, but 'input' has shape"
            " [8, 64]",
        ),
        (
            {"dynamic_batching": {"preferred_batch_sizes": [16, 64]}},
            "dynamic_batching.preferred_batch_sizes",
            "each must be at most max_batch_size (32), got [16, 64]",
        ),
    ],
)
def test_declarations_that_do_not_match_the_graph(
    config: dict[str, Any], key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve(config)
    assert caught.value.message.startswith(f"repo/m/config.yaml: {key}: {problem}")


def test_max_batch_size_needs_a_variable_first_dimension_in_the_graph() -> None:
    image = (TensorSpec("image", "FP32", (1, 3, 224, 224)),)
    with pytest.raises(ConfigError) as caught:
        resolve({"max_batch_size": 4}, inputs=image)
    assert caught.value.message == (
        "repo/m/config.yaml: max_batch_size: 4 needs a variable first dimension on every input"
        " and output, but 'image' has shape [1, 3, 224, 224]"
    )


def test_preferred_sizes_fit_a_derived_no_batching() -> None:
    image = (TensorSpec("image", "FP32", (1, 3)),)
    with pytest.raises(ConfigError, match=r"at most max_batch_size \(0\), got \[2\]"):
        resolve({"dynamic_batching": {"preferred_batch_sizes": [2]}}, inputs=image)
