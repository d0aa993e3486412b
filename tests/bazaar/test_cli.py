"""The ``bazaar`` command wires every subcommand and its options."""

from __future__ import annotations

from pathlib import Path

import pytest

from bazaar.cli import main, parser
from gateway.config import GatewayConfig
from protocol import __version__
from protocol.limits import EdgeLimits


@pytest.mark.parametrize(
    "command,options",
    [
        (
            ["model-server"],
            ["--model-repository", "--model", "--max-override-batch-size", "--max-models"],
        ),
        (["serve"], ["--workers-per-model", "--max-workers-per-model", "--scale-to-zero-after"]),
        (["gateway"], ["--endpoints", "--kubernetes-namespace", "--max-queue-time"]),
        (["autoscaler"], ["--namespace", "--gateway", "--prometheus"]),
        (["simulate"], ["--trace", "--policy", "--cold-start-s"]),
        (["replay"], ["--trace", "--duration-s", "--peak-rps", "--min-batch-time-ms"]),
        (["autoscaler"], ["--keda", "--keda-port"]),
        (["loadtest"], ["--host", "--scenario", "--slo-p99-ms"]),
        (["bench"], ["--quick", "--duration", "--models", "--scenarios"]),
        (["models", "build-demo"], ["DIR"]),
    ],
)
def test_every_subcommand_answers_help(
    command: list[str], options: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for option in options:
        assert option in text


def test_gateway_needs_exactly_one_endpoint_source(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["gateway"])
    assert exited.value.code == 2
    assert "--endpoints" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"bazaar {__version__}\n"


@pytest.mark.parametrize("command", [["serve"], ["gateway", "--kubernetes-namespace", "ns"]])
def test_batches_go_to_pods_over_binary_http_unless_told(command: list[str]) -> None:
    # Through a gateway on a quiet machine the HTTP hop carried 1.3-1.6x the gRPC hop's calls.
    assert parser().parse_args(command).hop == "http"


def test_the_gateway_options_default_to_the_gateway_config() -> None:
    defaults = GatewayConfig()
    args = parser().parse_args(["gateway", "--endpoints", "file.yaml"])
    assert args.max_batches_per_endpoint == defaults.max_batches_per_endpoint
    assert args.max_queue_time == defaults.max_queue_time_s
    assert args.drain_timeout == defaults.drain_timeout_s


@pytest.mark.parametrize(
    "option,value",
    [
        ("--max-queue-time", "0"),
        ("--max-queue-time", "-5"),
        ("--max-queue-time", "nan"),
        ("--drain-timeout", "-1"),
        ("--max-batches-per-endpoint", "0"),
        ("--port", "70000"),
        ("--header-timeout", "0"),
        ("--max-connections", "-1"),
        ("--max-body-bytes", "1.5"),
    ],
)
def test_a_bad_number_is_refused_at_start_naming_its_option(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["gateway", "--endpoints", "file.yaml", option, value])
    assert exited.value.code == 2
    assert f"argument {option}: must be" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        ["gateway", "--endpoints", "file.yaml"],
        ["serve"],
        ["model-server", "--model-repository", "repo"],
    ],
)
def test_every_server_takes_the_client_limits(command: list[str]) -> None:
    from bazaar.cli import _edge_limits

    assert _edge_limits(parser().parse_args(command)) == EdgeLimits()
    limits = _edge_limits(parser().parse_args([*command, "--header-timeout", "0.5"]))
    assert limits.header_timeout_s == 0.5
    limits = _edge_limits(parser().parse_args([*command, "--oversize-answer-delay", "0"]))
    assert limits.oversize_answer_delay_s == 0


def test_the_gateway_config_carries_the_client_limits() -> None:
    from bazaar.cli import _gateway_config

    args = parser().parse_args(["gateway", "--endpoints", "f", "--max-connections", "7"])
    assert _gateway_config(args).edge.max_connections == 7


def test_a_bad_file_named_on_the_command_line_exits_2_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("models: {m: ['http://127.0.0.1:9']}\n")
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("tenants: {a: {weight: 0}}\n")
    assert main(["gateway", "--endpoints", str(endpoints), "--tenants", str(tenants)]) == 2
    assert f"{tenants}: tenants.a.weight: must be > 0" in caplog.text
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("command", [["gateway", "--endpoints", "f"], ["serve"]])
def test_the_gateway_takes_api_keys_and_the_scopes_open_without_one(command: list[str]) -> None:
    args = parser().parse_args([*command, "--api-keys", "k.json", "--open-scopes", "health,stats"])
    assert (str(args.api_keys), args.open_scopes) == ("k.json", frozenset({"health", "stats"}))
    assert parser().parse_args([*command, "--open-scopes", ""]).open_scopes == frozenset()


def test_an_unknown_scope_is_refused_at_start(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["gateway", "--endpoints", "f", "--api-keys", "k", "--open-scopes", "infer,admin"])
    assert exited.value.code == 2
    assert "argument --open-scopes: unknown scope admin" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options,words",
    [
        (["--open-scopes", "metrics"], "--open-scopes: goes with --api-keys"),
        (["--ssl-client-cert", "required"], "go with --ssl-certfile"),
        (["--ssl-keyfile", "key.pem"], "go with --ssl-certfile"),
        (["--rollout-peers", "http://g:8000"], "--rollout-peers goes with --leader-election-id"),
        (["--hop", "grpc"], "--hop goes with --kubernetes-namespace"),
    ],
)
def test_options_without_the_one_they_complete_are_refused(
    options: list[str], words: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert main(["gateway", "--endpoints", "f", *options]) == 2
    assert words in caplog.text


def test_a_rollout_peers_token_file_that_cannot_be_read_stops_the_gateway_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "token"
    options = ["--leader-election-id", "me", "--rollout-peers", "http://g:8000"]
    options += ["--rollout-peers-token-file", str(missing)]
    assert main(["gateway", "--kubernetes-namespace", "ns", *options]) == 2
    assert f"{missing}: cannot read" in caplog.text


@pytest.mark.parametrize("model", ["digits@x", "digits@0", "digits@"])
def test_a_model_server_pinned_to_no_version_is_refused_at_start(
    tmp_path: Path, model: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert main(["model-server", "--model-repository", str(tmp_path), "--model", model]) == 2
    assert f"--model: {model}: expected NAME or NAME@VERSION, VERSION >= 1" in caplog.text
