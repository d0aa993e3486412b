"""Tenants' quotas: the tenants file, the request-rate bucket and the rows in flight."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.tenants import ANONYMOUS, TenantPolicies, TenantPolicy, Tenants, load_tenants
from protocol.errors import ConfigError, QuotaExceeded


def test_the_tenants_file_gives_each_tenant_its_policy_and_the_rest_the_default(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(
        "default: {requests_per_second: 5}\n"
        "tenants:\n"
        "  team-a: {requests_per_second: 200, burst: 400, max_concurrent_rows: 64, weight: 2}\n"
    )
    tenants = Tenants(load_tenants(path))
    assert tenants.get("team-a").policy == TenantPolicy(200, 400, 64, 2)
    assert tenants.get("team-b").policy == TenantPolicy(requests_per_second=5)
    assert tenants.get(None).name == ANONYMOUS
    assert tenants.get(None).policy == TenantPolicy(requests_per_second=5)
    assert tenants.get("team-a") is tenants.get("team-a")  # one state per tenant


@pytest.mark.parametrize(
    "text,names",
    [
        ("tenants: {a: {requests_per_second: -1}}", "tenants.a.requests_per_second"),
        ("tenants: {a: {weight: 0}}", "tenants.a.weight"),
        ("tenants: {a: {max_concurrent_rows: 1.5}}", "whole number"),
        ("tenants: {a: {rate: 1}}", "keys among"),
        ("tenants: {a: {burst: .nan}}", "tenants.a.burst"),
        ("tenants: {a: {burst: fast}}", "must hold numbers"),
        ("tenants: [a]", "mapping of tenant name"),
        ("quotas: {}", "keys 'default' and 'tenants'"),
        ("default: {weight: -2}", "default.weight"),
    ],
)
def test_a_bad_tenants_file_is_refused_naming_what_is_wrong(
    tmp_path: Path, text: str, names: str
) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=names) as refused:
        load_tenants(path)
    assert str(path) in str(refused.value)


def test_the_request_rate_is_a_token_bucket_with_its_burst() -> None:
    tenant = Tenants(TenantPolicies(TenantPolicy(requests_per_second=10, burst=3))).get("a")
    for _ in range(3):
        tenant.admit(100.0)  # the burst
    with pytest.raises(QuotaExceeded, match="request rate of 10/s") as refused:
        tenant.admit(100.0)
    assert refused.value.status == 429
    assert refused.value.quota == "rate"
    assert refused.value.retry_after_s == pytest.approx(0.1)
    assert refused.value.headers() == {"Retry-After": "1"}
    tenant.admit(100.1)  # one token refilled in 100 ms
    with pytest.raises(QuotaExceeded):
        tenant.admit(100.1)
    tenant.admit(200.0)  # refilled up to the burst, no further
    tenant.admit(200.0)
    tenant.admit(200.0)
    with pytest.raises(QuotaExceeded):
        tenant.admit(200.0)


def test_rows_in_flight_are_capped_before_and_after_the_body_is_decoded() -> None:
    tenant = Tenants(TenantPolicies(TenantPolicy(max_concurrent_rows=64))).get("a")
    tenant.admit(0.0)
    tenant.take_rows(60)
    tenant.admit(0.0)  # 60 of 64: a request may still fit
    with pytest.raises(QuotaExceeded, match="60 rows in flight; 8 more") as refused:
        tenant.take_rows(8)
    assert refused.value.quota == "rows"
    tenant.take_rows(4)
    with pytest.raises(QuotaExceeded, match="64 rows in flight, its limit"):
        tenant.admit(0.0)  # full: refused before its body is decoded
    tenant.release_rows(64)
    tenant.admit(0.0)


def test_without_a_policy_nothing_is_limited() -> None:
    tenant = Tenants(TenantPolicies()).get(None)
    for _ in range(10_000):
        tenant.admit(0.0)
        tenant.take_rows(1_000)
    assert tenant.rows_in_flight == 10_000_000
