"""bazaar against a real Kubernetes API server and controller manager (1.20, built by build.sh).

``kubectl apply`` of the CPU overlay, the RBAC of each ServiceAccount checked with its real
token (``kubectl auth can-i`` and bazaar's own clients), re-applying without resetting the
replicas the autoscaler set, leader election on a real Lease, and the ``bazaar autoscaler``
process scaling the example model through the real Deployment controller while the fake
node makes the pods it creates Ready.

1.20 does not serve ``policy/v1`` (PodDisruptionBudget) nor ``discovery.k8s.io/v1``: the
PDBs are left out of the apply here (tests/deploy validates them against the current
schemas), and discovery is tested against the fake API fed with the shapes the real
endpointslice controller writes (``tests/cluster``).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from kubernetes import client
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from autoscaler.deployments import REQUIRED_RBAC as AUTOSCALER_RBAC
from autoscaler.deployments import KubernetesScaler
from cluster.api import Cluster, Permission
from cluster.lease import LeaderElection
from gateway.discovery import REQUIRED_RBAC as DISCOVERY_RBAC
from gateway.rollout import Rollout, StepCounts, latency_bucket
from gateway.rollout_peers import RolloutPeers
from gateway.rollout_record import LEASE_NAME as GATEWAY_LEASE
from gateway.rollout_record import ROLLOUT_ANNOTATION, ROLLOUT_RBAC, ServiceRolloutRecord
from protocol.traffic import RolloutPolicy
from tests.controlplane.controlplane import ControlPlane, FakeNode, close_api_client, wait_for
from tests.support import free_port, serve

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "bazaar"
MODEL = "bazaar-model-mlp"
NOT_SERVED_BY_1_20 = {("policy/v1", "PodDisruptionBudget")}
LEASE = "bazaar-autoscaler"
GATEWAY_RBAC = DISCOVERY_RBAC | ROLLOUT_RBAC


def rendered(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "deploy" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def apply(control_plane: ControlPlane, documents: list[dict[str, Any]], *options: str) -> str:
    served = [
        doc for doc in documents if (doc["apiVersion"], doc["kind"]) not in NOT_SERVED_BY_1_20
    ]
    done = subprocess.run(
        ["kubectl", "--kubeconfig", str(control_plane.kubeconfig), "apply", *options, "-f", "-"],
        input=yaml.safe_dump_all(served),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def deployed(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    """The CPU overlay applied for real, with a fake node running the namespace's pods."""
    output = apply(control_plane, rendered("overlays/cpu"))
    assert f"deployment.apps/{MODEL} created" in output
    node = FakeNode(control_plane, name="bazaar-e2e-node", namespaces=[NAMESPACE]).start()
    api = control_plane.api_client()
    try:
        yield api
    finally:
        node.stop()
        client.CoreV1Api(api).delete_namespace(NAMESPACE, propagation_policy="Background")
        close_api_client(api)


def replicas(api: client.ApiClient) -> tuple[int, int]:
    deployment = client.AppsV1Api(api).read_namespaced_deployment(MODEL, NAMESPACE)
    return deployment.spec.replicas, deployment.status.ready_replicas or 0


def test_the_overlay_creates_everything_and_its_pods_become_ready(
    deployed: client.ApiClient,
) -> None:
    apps = client.AppsV1Api(deployed)

    def ready(name: str) -> int:
        return apps.read_namespaced_deployment(name, NAMESPACE).status.ready_replicas or 0

    wait_for(lambda: ready("bazaar-gateway") == 2, 60, "two ready gateways")
    wait_for(lambda: ready("bazaar-autoscaler") == 2, 60, "two ready autoscalers")
    wait_for(lambda: ready(MODEL) == 1, 60, "one ready model pod")
    policies = client.NetworkingV1Api(deployed).list_namespaced_network_policy(NAMESPACE)
    assert {p.metadata.name for p in policies.items} >= {"default-deny-ingress", "bazaar-model"}


@pytest.mark.parametrize("kustomization", ["overlays/gpu", "locust"])
def test_the_other_renders_pass_the_real_servers_validation_and_admission(
    control_plane: ControlPlane, deployed: client.ApiClient, kustomization: str
) -> None:
    """A server-side dry run: every object goes through the API server's validation and
    admission (into the namespace the CPU overlay made), and nothing is stored."""
    documents = [doc for doc in rendered(kustomization) if doc["kind"] != "Namespace"]
    output = apply(control_plane, documents, "--dry-run=server")
    assert "(server dry run)" in output
    kinds = {doc["kind"] for doc in documents} - {kind for _, kind in NOT_SERVED_BY_1_20}
    assert len(output.strip().splitlines()) == sum(1 for doc in documents if doc["kind"] in kinds)


def test_reapplying_the_manifests_keeps_the_replicas_the_autoscaler_set(
    control_plane: ControlPlane, deployed: client.ApiClient
) -> None:
    apps = client.AppsV1Api(deployed)
    apps.patch_namespaced_deployment_scale(MODEL, NAMESPACE, {"spec": {"replicas": 3}})
    apply(control_plane, rendered("overlays/cpu"))
    assert replicas(deployed)[0] == 3
    wait_for(lambda: replicas(deployed)[1] == 3, 60, "three ready model pods")
    apps.patch_namespaced_deployment_scale(MODEL, NAMESPACE, {"spec": {"replicas": 1}})
    wait_for(lambda: replicas(deployed) == (1, 1), 60, "back to one")


MATRIX = [
    Permission(group, resource, verb)
    for group, resource in [
        ("apps", "deployments"),
        ("apps", "deployments/scale"),
        ("", "pods"),
        ("", "services"),
        ("", "secrets"),
        ("discovery.k8s.io", "endpointslices"),
        ("coordination.k8s.io", "leases"),
    ]
    for verb in ["get", "list", "watch", "create", "update", "patch", "delete"]
]


def can_i(kubeconfig: Path, permission: Permission, lease: str) -> bool:
    resource, _, subresource = permission.resource.partition("/")
    if permission.api_group:
        resource += "." + permission.api_group
    if resource == "leases.coordination.k8s.io":
        resource += "/" + lease  # the Role names the one Lease it may read and renew
    command = ["kubectl", "--kubeconfig", str(kubeconfig), "auth", "can-i", permission.verb]
    command += [resource, "-n", NAMESPACE]
    if subresource:
        command.append(f"--subresource={subresource}")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return done.stdout.strip() == "yes"


@pytest.mark.parametrize(
    ("account", "required", "lease"),
    [
        ("bazaar-autoscaler", AUTOSCALER_RBAC, LEASE),
        ("bazaar-gateway", GATEWAY_RBAC, GATEWAY_LEASE),
    ],
)
def test_each_service_account_may_do_exactly_what_its_code_calls(
    control_plane: ControlPlane,
    deployed: client.ApiClient,
    account: str,
    required: frozenset[Permission],
    lease: str,
) -> None:
    token = control_plane.service_account_token(NAMESPACE, account, create=False)
    kubeconfig = control_plane.kubeconfig_for_token(token)
    # Each check is a kubectl process of its own, mostly start-up: several at once.
    with ThreadPoolExecutor(8) as pool:
        answers = pool.map(lambda permission: can_i(kubeconfig, permission, lease), MATRIX)
        allowed = {permission for permission, yes in zip(MATRIX, answers, strict=True) if yes}
    assert allowed == set(required)


async def test_the_scaler_reads_the_model_with_its_token_and_a_forbidden_call_is_logged_once(
    control_plane: ControlPlane, deployed: client.ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    token = control_plane.service_account_token(NAMESPACE, "bazaar-autoscaler", create=False)
    log = logging.getLogger("autoscaler.deployments")
    scaler = KubernetesScaler(
        Cluster(NAMESPACE, "autoscaler", log, control_plane.api_client(token))
    )
    try:
        [target] = await scaler.targets()
        assert (target.model, target.config.max_replicas) == ("mlp", 8)
    finally:
        scaler.close()
    gateway_token = control_plane.service_account_token(NAMESPACE, "bazaar-gateway", create=False)
    wrong = KubernetesScaler(
        Cluster(NAMESPACE, "gateway", log, control_plane.api_client(gateway_token))
    )
    try:
        with caplog.at_level(logging.ERROR, "autoscaler.deployments"):
            assert await wrong.targets() == []
            assert await wrong.targets() == []
    finally:
        wrong.close()
    [message] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("RBAC")]
    assert "cannot list deployments in namespace bazaar; grant verbs [list]" in message


async def test_two_candidates_on_a_real_lease_have_one_leader(
    control_plane: ControlPlane, deployed: client.ApiClient
) -> None:
    token = control_plane.service_account_token(NAMESPACE, "bazaar-autoscaler", create=False)
    log = logging.getLogger("lease")
    clusters = [
        Cluster(NAMESPACE, "autoscaler", log, control_plane.api_client(token)) for _ in "ab"
    ]
    a, b = (LeaderElection(c, LEASE, who) for c, who in zip(clusters, "ab", strict=True))
    try:
        assert await a.try_acquire_or_renew()
        assert not await b.try_acquire_or_renew()
        await a.release()
        assert await b.try_acquire_or_renew()
        lease = client.CoordinationV1Api(deployed).read_namespaced_lease(LEASE, NAMESPACE)
        assert (lease.spec.holder_identity, lease.spec.lease_transitions) == ("b", 1)
        await b.release()
    finally:
        for c in clusters:
            c.close()


async def test_the_deciding_gateway_sums_its_peers_and_saves_with_its_own_token_alone(
    control_plane: ControlPlane, deployed: client.ApiClient
) -> None:
    """With the gateway's real token, the whole of a decision on every gateway's samples:
    the rollouts' Lease, the peers' samples (DNS and their /stats: no Kubernetes call, so
    the Role the matrix above holds exact covers it) and the saved step."""
    token = control_plane.service_account_token(NAMESPACE, "bazaar-gateway", create=False)
    cluster = Cluster(
        NAMESPACE, "gateway", logging.getLogger("rollout"), control_plane.api_client(token)
    )
    record = ServiceRolloutRecord(cluster, LeaderElection(cluster, GATEWAY_LEASE, "decider"))
    policy = RolloutPolicy("2", (10.0, 100.0), step_s=0.0, min_requests=10)
    rollout = Rollout("mlp", policy, now=0.0)
    counts = StepCounts(requests=10, latency_s={latency_bucket(0.01): 10})
    sample = {"policy": policy.to_json(), "step": 0, **counts.to_json()}

    def stats(instance: str) -> Starlette:
        body = {"instance": instance, "models": {"mlp": {"rollout": {"sample": sample}}}}
        return Starlette(routes=[Route("/stats", lambda _: JSONResponse(body))])

    peers = RolloutPeers([])
    try:
        assert await record.election.try_acquire_or_renew()
        async with serve(stats("decider")) as own, serve(stats("other")) as other:
            peers.urls = [own, other]  # the decider is among them, as in a headless Service
            published = await peers.read("decider")
        assert published == {"mlp": [sample]}
        assert rollout.tick(1.0, 0, 0, rollout.peer_counts(published["mlp"])).action == "advance"
        assert await record.save("mlp", rollout.saved())
        assert await record.load("mlp") == rollout.saved()
    finally:
        await peers.close()
        await record.election.release()
        cluster.close()
        annotations = {"metadata": {"annotations": {ROLLOUT_ANNOTATION: None}}}
        client.CoreV1Api(deployed).patch_namespaced_service(
            "bazaar-model-mlp", NAMESPACE, annotations
        )


class BusyGateway(BaseHTTPRequestHandler):
    """A gateway's /stats with a deep queue for mlp: the autoscaler must scale it up."""

    admitted: ClassVar[int] = 0

    def do_GET(self) -> None:
        BusyGateway.admitted += 100
        mlp = {
            "queued": 400,
            "queued_rows": 400,
            "inflight_batches": 0,
            "inflight_rows": 0,
            "admitted": BusyGateway.admitted,
            "admitted_rows": BusyGateway.admitted,
            "completed_rows": 0,
        }
        body = json.dumps({"models": {"mlp": mlp}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


def test_the_autoscaler_process_scales_the_model_through_the_real_controller(
    control_plane: ControlPlane, deployed: client.ApiClient, tmp_path: Path
) -> None:
    gateway = ThreadingHTTPServer(("127.0.0.1", 0), BusyGateway)
    threading.Thread(target=gateway.serve_forever, daemon=True).start()
    token = control_plane.service_account_token(NAMESPACE, "bazaar-autoscaler", create=False)
    command = [
        sys.executable, "-m", "bazaar", "autoscaler",
        "--namespace", NAMESPACE,
        "--gateway", f"http://127.0.0.1:{gateway.server_address[1]}",
        "--kubeconfig", str(control_plane.kubeconfig_for_token(token)),
        "--metrics-port", str(free_port()),
        "--leader-election-id", "autoscaler-test",
    ]  # fmt: skip
    log = tmp_path / "autoscaler.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        # It leads, reads the annotations (max 8), asks /scale for more, the Deployment
        # controller creates the pods, the node makes them Ready.
        wait_for(lambda: replicas(deployed)[0] > 1, 60, f"a scale-up; log:\n{log.read_text()}")
        wanted = replicas(deployed)[0]
        assert wanted <= 8
        wait_for(lambda: replicas(deployed)[1] == wanted, 60, f"{wanted} ready model pods")
        lease = client.CoordinationV1Api(deployed).read_namespaced_lease(LEASE, NAMESPACE)
        assert lease.spec.holder_identity == "autoscaler-test"
    finally:
        process.terminate()
        process.wait(timeout=30)
        gateway.shutdown()
        gateway.server_close()
    client.AppsV1Api(deployed).patch_namespaced_deployment_scale(
        MODEL, NAMESPACE, {"spec": {"replicas": 1}}
    )


async def test_the_scaler_sizes_the_model_group_as_one_target_with_its_own_token(
    control_plane: ControlPlane, deployed: client.ApiClient
) -> None:
    # The model-group overlay's own objects (its Deployment and the Services of its models)
    # beside the CPU overlay's: the group is one target, and its /scale is the autoscaler's.
    cpu = {(doc["kind"], doc["metadata"]["name"]) for doc in rendered("overlays/cpu")}
    group = [
        doc
        for doc in rendered("overlays/model-group")
        if (doc["kind"], doc["metadata"]["name"]) not in cpu and doc["kind"] != "Namespace"
    ]
    assert {doc["kind"] for doc in group} >= {"Deployment", "Service"}
    apply(control_plane, group)
    token = control_plane.service_account_token(NAMESPACE, "bazaar-autoscaler", create=False)
    log = logging.getLogger("autoscaler.deployments")
    scaler = KubernetesScaler(
        Cluster(NAMESPACE, "autoscaler", log, control_plane.api_client(token))
    )
    try:
        targets = {target.name: target for target in await scaler.targets()}
        assert set(targets) == {"mlp", "small"}
        small = targets["small"]
        assert small.models == ("digits", "mlp_wide")
        assert (small.config.min_replicas, small.config.max_replicas) == (2, 8)
        await scaler.scale("small", 3, "test")
        scale = client.AppsV1Api(deployed).read_namespaced_deployment_scale(
            "bazaar-model-group-small", NAMESPACE
        )
        assert scale.spec.replicas == 3
    finally:
        scaler.close()
        delete(control_plane, group)


def delete(control_plane: ControlPlane, documents: list[dict[str, Any]]) -> None:
    """``kubectl delete`` of what ``apply`` applied of ``documents``."""
    served = [
        doc for doc in documents if (doc["apiVersion"], doc["kind"]) not in NOT_SERVED_BY_1_20
    ]
    subprocess.run(
        ["kubectl", "--kubeconfig", str(control_plane.kubeconfig), "delete", "-f", "-"],
        input=yaml.safe_dump_all(served),
        capture_output=True,
        text=True,
        check=True,
    )
