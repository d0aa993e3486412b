"""Fixtures for tests against a real Kubernetes control plane (see ``controlplane.py``).

``control_plane`` (session): etcd + kube-apiserver + kube-controller-manager, started once per
session and stopped (SIGTERM, then SIGKILL) at its end. The binaries come from
``tests/controlplane/build.sh``, which ``make`` runs before pytest; when they are missing the
fixture fails (it does not skip) and says so.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.controlplane.controlplane import (
    BUILD_SCRIPT,
    ControlPlane,
    FakeNode,
    binaries_missing,
    close_api_client,
)


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    missing = binaries_missing()
    if missing:
        pytest.fail(
            f"the Kubernetes control-plane binaries are not built ({', '.join(missing)}): "
            f"run {BUILD_SCRIPT} first (8+ minutes on 2 cores, once; `make test` runs it)",
            pytrace=False,
        )
    began = time.monotonic()
    plane = ControlPlane().start()
    plane.timings["started"] = time.monotonic() - began
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def api(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    """An admin ``ApiClient`` for the control plane, closed after the test."""
    api_client = control_plane.api_client()
    try:
        yield api_client
    finally:
        close_api_client(api_client)


@pytest.fixture
def namespace(control_plane: ControlPlane, api: client.ApiClient) -> Iterator[str]:
    """A fresh namespace whose ``default`` ServiceAccount already has its token (pods created
    before that are rejected by admission); deleted after the test."""
    core = client.CoreV1Api(api)
    name = f"test-{secrets.token_hex(4)}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        control_plane.service_account_token(name, "default", create=False)
        yield name
    finally:
        try:
            core.delete_namespace(name, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:
                raise


@pytest.fixture
def fake_node(control_plane: ControlPlane, namespace: str) -> Iterator[FakeNode]:
    """A :class:`FakeNode` named ``bazaar-node`` that runs the pods of ``namespace``."""
    node = FakeNode(control_plane, namespaces=[namespace]).start()
    try:
        yield node
    finally:
        node.stop()
