"""The decode-cost benchmark runs: one small body, measured in a child process."""

from __future__ import annotations

import pytest

from loadtests.decodecost import main


def test_a_shape_is_measured_and_its_outcome_reported(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--mib", "2", "--case", "json_parameters_wide", "--case", "binary_fp32"]) == 0
    header, wide, binary = capsys.readouterr().out.splitlines()
    assert header.split()[:4] == ["case", "body", "MiB", "peak"]
    assert wide.startswith("json_parameters_wide") and "413 the JSON header" in wide
    assert binary.startswith("binary_fp32") and "decoded x[1, 524288]" in binary
