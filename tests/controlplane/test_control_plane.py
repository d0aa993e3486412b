"""The real control plane at work: the deployment, replicaset and endpointslice controllers, RBAC
with ServiceAccount tokens, and kubectl, with :class:`FakeNode` standing in for a kubelet."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.controlplane.controlplane import (
    BIN_DIR,
    ControlPlane,
    ControlPlaneError,
    FakeNode,
    binaries_missing,
    wait_for,
)

KUBECTL = "/usr/bin/kubectl"
IMAGE = "registry.invalid/bazaar/dummy:1"  # never pulled: FakeNode runs nothing
TIMEOUT_S = 60.0


def deployment(name: str, replicas: int) -> client.V1Deployment:
    labels = {"app": name}
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    containers=[
                        client.V1Container(
                            name="main",
                            image=IMAGE,
                            ports=[client.V1ContainerPort(name="http", container_port=8080)],
                        )
                    ]
                ),
            ),
        ),
    )


def test_missing_binaries_name_build_script(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    assert binaries_missing(bin_dir) == [str(tmp_path / ".complete")]
    with pytest.raises(ControlPlaneError, match=r"run .*tests/controlplane/build\.sh"):
        ControlPlane(bin_dir=bin_dir, workdir=tmp_path / "work").start()


def test_start_up_failure_shows_the_log_tail(control_plane: ControlPlane, tmp_path: Path) -> None:
    """A kube-apiserver that dies at start: the error carries the last 40 lines of its log, and
    the etcd already started is stopped."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / ".complete").touch()
    (bin_dir / "etcd").symlink_to(BIN_DIR / "etcd")
    (bin_dir / "kube-controller-manager").symlink_to(BIN_DIR / "kube-controller-manager")
    fake = bin_dir / "kube-apiserver"
    fake.write_text("#!/bin/sh\nfor i in $(seq 1 100); do echo line $i; done\nexit 3\n")
    fake.chmod(0o755)
    plane = ControlPlane(bin_dir=bin_dir, workdir=tmp_path / "work")
    with pytest.raises(ControlPlaneError) as failed:
        plane.start()
    message = str(failed.value)
    assert "kube-apiserver exited with status 3" in message
    assert "line 61\n" in message and "line 100" in message and "line 60\n" not in message
    assert plane._processes == []  # etcd was stopped again


def ready_pods(core: client.CoreV1Api, namespace: str, app: str) -> list[client.V1Pod]:
    """Pods of ``app`` that are Ready and not being deleted."""
    pods = core.list_namespaced_pod(namespace, label_selector=f"app={app}").items
    return [
        p
        for p in pods
        if p.metadata.deletion_timestamp is None
        and any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))
    ]


def ready_replicas(apps: client.AppsV1Api, namespace: str, name: str) -> int:
    status = apps.read_namespaced_deployment_status(name, namespace).status
    return status.ready_replicas or 0


def test_deployment_pods_are_bound_and_ready(
    api: client.ApiClient, namespace: str, fake_node: FakeNode
) -> None:
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    apps.create_namespaced_deployment(namespace, deployment("web", replicas=2))

    wait_for(
        lambda: ready_replicas(apps, namespace, "web") == 2,
        TIMEOUT_S,
        "deployment web to report readyReplicas == 2",
    )

    replica_sets = apps.list_namespaced_replica_set(namespace, label_selector="app=web").items
    assert len(replica_sets) == 1
    assert replica_sets[0].metadata.owner_references[0].kind == "Deployment"
    pods = ready_pods(core, namespace, "web")
    assert len(pods) == 2
    assert {p.spec.node_name for p in pods} == {"bazaar-node"}
    assert all(p.metadata.owner_references[0].name == replica_sets[0].metadata.name for p in pods)
    ips = {p.status.pod_ip for p in pods}
    assert len(ips) == 2
    assert all(ip.startswith("127.0.0.") and ip != "127.0.0.1" for ip in ips)
    assert all(p.status.phase == "Running" for p in pods)
    # The controllers use their own ServiceAccounts (--use-service-account-credentials).
    accounts = core.list_namespaced_service_account("kube-system").items
    assert {"deployment-controller", "replicaset-controller"} <= {a.metadata.name for a in accounts}


def test_scaling_up_and_to_zero(api: client.ApiClient, namespace: str, fake_node: FakeNode) -> None:
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    apps.create_namespaced_deployment(namespace, deployment("web", replicas=1))
    wait_for(lambda: ready_replicas(apps, namespace, "web") == 1, TIMEOUT_S, "1 ready replica")

    apps.patch_namespaced_deployment_scale("web", namespace, {"spec": {"replicas": 3}})
    wait_for(
        lambda: (
            len(ready_pods(core, namespace, "web")) == 3
            and ready_replicas(apps, namespace, "web") == 3
        ),
        TIMEOUT_S,
        "3 ready pods after scaling to 3",
    )
    assert len(set(fake_node.pod_ips().values())) == 3

    apps.patch_namespaced_deployment_scale("web", namespace, {"spec": {"replicas": 0}})
    # Scale-down deletes gracefully (deletionTimestamp set); FakeNode finalises the pods.
    wait_for(
        lambda: not core.list_namespaced_pod(namespace, label_selector="app=web").items,
        TIMEOUT_S,
        "every pod gone after scaling to 0",
    )
    wait_for(lambda: not fake_node.pod_ips(), TIMEOUT_S, "FakeNode to free the pod IPs")
    status = apps.read_namespaced_deployment_status("web", namespace).status
    assert (status.replicas or 0) == 0


def test_service_account_token_is_limited_by_its_role(
    control_plane: ControlPlane, api: client.ApiClient, namespace: str
) -> None:
    rbac = client.RbacAuthorizationV1Api(api)
    rbac.create_namespaced_role(
        namespace,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="pod-reader"),
            rules=[client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["get", "list"])],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="pod-reader"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="Role", name="pod-reader"
            ),
            subjects=[
                client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=namespace)
            ],
        ),
    )
    token = control_plane.service_account_token(namespace, "reader")

    with control_plane.api_client(token) as reader:
        core, apps = client.CoreV1Api(reader), client.AppsV1Api(reader)

        def can_list_pods() -> bool:
            try:
                core.list_namespaced_pod(namespace)
            except ApiException as e:
                if e.status == 403:  # the RBAC authorizer's informer has not seen the binding
                    return False
                raise
            return True

        wait_for(can_list_pods, TIMEOUT_S, "the reader token to be allowed to list pods")
        _, status, _ = core.list_namespaced_pod_with_http_info(namespace)
        assert status == 200

        with pytest.raises(ApiException) as denied:
            apps.list_namespaced_deployment(namespace)
        assert denied.value.status == 403
        with pytest.raises(ApiException) as other_namespace:
            core.list_namespaced_pod("default")
        assert other_namespace.value.status == 403


def kubectl(control_plane: ControlPlane, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [KUBECTL, f"--kubeconfig={control_plane.kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"kubectl {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


# What the 1.20 endpointslice controller writes for the Service below (discovery.k8s.io/v1beta1;
# discovery.k8s.io/v1 only exists from 1.21). One slice per Service and address type, named
# "<service>-<random>", labelled kubernetes.io/service-name=<service> and
# endpointslice.kubernetes.io/managed-by=endpointslice-controller.k8s.io, owned by the Service:
#   addressType: "IPv4"
#   endpoints[]: {"addresses": ["127.0.0.2"], "conditions": {"ready": true},
#                 "targetRef": {"kind": "Pod", "namespace", "name", "uid", "resourceVersion"},
#                 "topology": {"kubernetes.io/hostname": "bazaar-node"}}
#     (v1beta1 has "topology"; v1 has "nodeName"/"zone" instead; 1.20 sets no
#      "serving"/"terminating" conditions; an endpoint appears only once its pod has an IP)
#   ports[]: {"name": "http", "port": 8080, "protocol": "TCP"}   (port = the targetPort)
MANIFEST = textwrap.dedent(
    """\
    apiVersion: apps/v1
    kind: Deployment
    metadata:
      name: echo
      labels: {app: echo}
    spec:
      replicas: 2
      selector:
        matchLabels: {app: echo}
      template:
        metadata:
          labels: {app: echo}
        spec:
          containers:
          - name: main
            image: registry.invalid/bazaar/dummy:1
            ports:
            - {name: http, containerPort: 8080}
    ---
    apiVersion: v1
    kind: Service
    metadata:
      name: echo
    spec:
      selector: {app: echo}
      ports:
      - {name: http, port: 80, targetPort: http}
    """
)


def test_kubectl_apply_and_endpointslices(
    control_plane: ControlPlane,
    api: client.ApiClient,
    namespace: str,
    fake_node: FakeNode,
    tmp_path: Path,
) -> None:
    manifest = tmp_path / "echo.yaml"
    manifest.write_text(MANIFEST)
    out = kubectl(control_plane, "apply", "-n", namespace, "-f", str(manifest))
    assert "deployment.apps/echo created" in out
    assert "service/echo created" in out

    custom = client.CustomObjectsApi(api)

    def slices() -> list[dict[str, Any]]:
        body = custom.list_namespaced_custom_object(
            "discovery.k8s.io",
            "v1beta1",
            namespace,
            "endpointslices",
            label_selector="kubernetes.io/service-name=echo",
        )
        return list(body["items"])

    def ready_addresses() -> set[str]:
        return {
            address
            for s in slices()
            for e in s.get("endpoints") or []
            if (e.get("conditions") or {}).get("ready")
            for address in e["addresses"]
        }

    wait_for(lambda: len(ready_addresses()) == 2, TIMEOUT_S, "2 ready endpoints for echo")

    pods = ready_pods(client.CoreV1Api(api), namespace, "echo")
    assert ready_addresses() == {p.status.pod_ip for p in pods}
    [endpoint_slice] = slices()
    assert endpoint_slice["addressType"] == "IPv4"
    assert endpoint_slice["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    labels = endpoint_slice["metadata"]["labels"]
    assert labels["endpointslice.kubernetes.io/managed-by"] == "endpointslice-controller.k8s.io"
    for endpoint in endpoint_slice["endpoints"]:
        assert endpoint["targetRef"]["kind"] == "Pod"
        assert endpoint["topology"]["kubernetes.io/hostname"] == "bazaar-node"

    listed = json.loads(
        kubectl(
            control_plane,
            "get",
            "endpointslices.v1beta1.discovery.k8s.io",
            "-n",
            namespace,
            "-o",
            "json",
        )
    )
    assert [s["metadata"]["name"] for s in listed["items"]] == [endpoint_slice["metadata"]["name"]]
    names = kubectl(control_plane, "get", "deployments", "-n", namespace, "-o", "name")
    assert names.split() == ["deployment.apps/echo"]


def test_on_pod_hook_runs_a_real_server_per_pod(
    control_plane: ControlPlane, api: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    """FakeNode's hooks start a real HTTP server on each pod's IP; the pod turns Ready (and its
    endpoint ready) only once that server accepts connections, and it is stopped on deletion."""
    (tmp_path / "index.html").write_text("hello from a pod\n")
    servers: dict[str, subprocess.Popen[bytes]] = {}

    def on_pod(pod: client.V1Pod) -> bool:
        ip = pod.status.pod_ip
        if pod.metadata.uid not in servers:
            servers[pod.metadata.uid] = subprocess.Popen(
                [sys.executable, "-m", "http.server", "8080", "--bind", ip],
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            return False  # reported Running, not Ready, until the server listens
        try:
            socket.create_connection((ip, 8080), timeout=0.2).close()
        except OSError:
            return False
        return True

    def on_delete(pod: client.V1Pod) -> None:
        server = servers.pop(pod.metadata.uid)
        server.terminate()
        server.wait(timeout=10)

    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    try:
        with FakeNode(control_plane, namespaces=[namespace], on_pod=on_pod, on_delete=on_delete):
            apps.create_namespaced_deployment(namespace, deployment("web", replicas=2))
            wait_for(lambda: ready_replicas(apps, namespace, "web") == 2, TIMEOUT_S, "2 ready")
            pods = ready_pods(core, namespace, "web")
            assert {p.metadata.uid for p in pods} == set(servers)
            for pod in pods:
                url = f"http://{pod.status.pod_ip}:8080/index.html"
                with urllib.request.urlopen(url, timeout=5) as response:
                    assert response.read() == b"hello from a pod\n"

            apps.patch_namespaced_deployment_scale("web", namespace, {"spec": {"replicas": 0}})
            wait_for(lambda: not servers, TIMEOUT_S, "on_delete to stop every server")
    finally:
        for server in servers.values():
            server.kill()
            server.wait()
