"""The ``bazaar`` command wires every subcommand and its options."""

from __future__ import annotations

import pytest

from bazaar.cli import main, parser
from gateway.config import GatewayConfig
from protocol import __version__


@pytest.mark.parametrize(
    "command,options",
    [
        (["model-server"], ["--model-repository", "--model"]),
        (["serve"], ["--workers-per-model", "--max-workers-per-model", "--scale-to-zero-after"]),
        (["gateway"], ["--endpoints", "--kubernetes-namespace", "--max-queue-time"]),
        (["autoscaler"], ["--namespace", "--gateway", "--prometheus"]),
        (["simulate"], ["--trace", "--policy", "--cold-start-s"]),
        (["loadtest"], ["--host", "--scenario", "--slo-p99-ms"]),
        (["bench"], ["--quick", "--duration", "--models"]),
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


def test_the_gateway_options_default_to_the_gateway_config() -> None:
    defaults = GatewayConfig()
    args = parser().parse_args(["gateway", "--endpoints", "file.yaml"])
    assert args.max_batches_per_endpoint == defaults.max_batches_per_endpoint
    assert args.max_queue_time == defaults.max_queue_time_s
    assert args.drain_timeout == defaults.drain_timeout_s
