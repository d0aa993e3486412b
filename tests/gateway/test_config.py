"""The endpoints file: URLs per model, or a mapping that also says how to treat the model;
every fault is a ``ConfigError`` naming the model and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import (
    GatewayConfig,
    ModelSettings,
    StaticModel,
    batch_policy,
    load_static_endpoints,
)
from gateway.discovery import StaticEndpoints
from gateway.dispatcher import BatchPolicy
from protocol.errors import ConfigError
from protocol.modelconfig import triton_config
from protocol.schema import ModelMetadata, TensorSpec


def test_a_list_of_urls_and_a_mapping_both_read(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text(
        "models:\n"
        "  digits: [http://a:8000/, http://b:8000]\n"
        "  echo:\n"
        "    endpoints: [http://c:8080]\n"
        "    validate: false\n"
        "  sklearn:\n"
        "    endpoints: [https://d:8080]\n"
        "    max_batch_size: 8\n"
    )
    assert load_static_endpoints(path) == {
        "digits": StaticModel(["http://a:8000", "http://b:8000"], ModelSettings()),
        "echo": StaticModel(["http://c:8080"], ModelSettings(validate=False)),
        "sklearn": StaticModel(["https://d:8080"], ModelSettings(max_batch_size=8)),
    }
    source = StaticEndpoints(path)
    assert source.models["echo"].endpoints == ["http://c:8080"]
    assert source.settings["echo"] == ModelSettings(validate=False)


def test_an_endpoint_may_give_its_grpc_address(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text(
        "models:\n"
        "  digits: [{url: http://a:8000/, grpc: a:9000}, http://b:8000]\n"
        "  mlp:\n"
        "    endpoints: [{url: http://c:8000, grpc: c:9000}]\n"
    )
    models = load_static_endpoints(path)
    assert models["digits"].endpoints == ["http://a:8000", "http://b:8000"]
    assert models["digits"].grpc_targets == {"http://a:8000": "a:9000"}
    assert models["mlp"].grpc_targets == {"http://c:8000": "c:9000"}
    source = StaticEndpoints(path)
    assert source.grpc_target("http://a:8000") == "a:9000"
    assert source.grpc_target("http://c:8000") == "c:9000"
    assert source.grpc_target("http://b:8000") is None


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("[]", "models.m: must be a non-empty list of URLs"),
        ("[ftp://x]", "models.m: 'ftp://x' is not an http(s) URL"),
        ("[{url: http://x}]", "models.m: {'url': 'http://x'}: an endpoint mapping has url and"),
        ("[{url: http://x, grpc: x}]", "models.m: grpc 'x' is not a host:port"),
        ("[{url: ftp://x, grpc: 'x:1'}]", "models.m: 'ftp://x' is not an http(s) URL"),
        ("7", "models.m: must be a list of URLs or a mapping with 'endpoints'"),
        ("{validate: false}", "models.m: has no 'endpoints'"),
        ("{endpoints: [http://x], batch: 2}", "models.m: unknown key(s) batch"),
        ("{endpoints: http://x}", "models.m.endpoints: must be a non-empty list of URLs"),
        ("{endpoints: [http://x], validate: no-thanks}", "models.m.validate: must be true or"),
        ("{endpoints: [http://x], max_batch_size: -1}", "models.m.max_batch_size: must be an"),
        ("{endpoints: [http://x], max_batch_size: 2.5}", "models.m.max_batch_size: must be an"),
        (
            "{endpoints: [http://x], traffic: {weights: {'1': -1}}}",
            "models.m.traffic.weights.1: must be a number >= 0",
        ),
        (
            "{endpoints: [http://x], validate: false, max_batch_size: 4}",
            "models.m.max_batch_size: an unvalidated model (validate: false) is passed through",
        ),
    ],
)
def test_a_bad_entry_is_refused_naming_its_key(tmp_path: Path, entry: str, problem: str) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text(f"models:\n  m: {entry}\n")
    with pytest.raises(ConfigError) as refused:
        load_static_endpoints(path)
    assert problem in str(refused.value)


def test_the_config_the_gateway_answers_reads_back_as_the_same_policy() -> None:
    """A gateway in front of a gateway (or of Triton, whose config this is) batches alike."""
    metadata = ModelMetadata(
        "m", "2", "onnxruntime_onnx", (TensorSpec("x", "FP32", (-1, 4)),), (), max_batch_size=16
    )
    policy = BatchPolicy(
        max_batch_size=16,
        max_queue_delay_s=0.0025,
        preferred_batch_sizes=(4, 8),
        max_queue_size=100,
        default_timeout_s=0.5,
        priority_levels=3,
        default_priority_level=2,
    )
    config = triton_config(
        metadata,
        max_queue_delay_s=policy.max_queue_delay_s,
        preferred_batch_sizes=policy.preferred_batch_sizes,
        max_queue_size=policy.max_queue_size,
        default_timeout_s=policy.default_timeout_s,
        priority_levels=policy.priority_levels,
        default_priority_level=policy.default_priority_level,
    )
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}]
    assert batch_policy(config, GatewayConfig()) == policy
