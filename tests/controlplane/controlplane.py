"""A real Kubernetes control plane for tests: etcd, kube-apiserver and kube-controller-manager
(v1.20.2, built by ``tests/controlplane/build.sh``) run as local processes on 127.0.0.1.

What runs where:

* ``etcd``: client and peer URLs on free loopback ports, data in ``<tmp>/etcd``.
* ``kube-apiserver``: HTTPS on a free loopback port (no insecure port), a self-signed serving
  certificate it writes into ``<tmp>/pki/apiserver.crt`` (that file doubles as the CA bundle),
  static token authentication (``<tmp>/tokens.csv``: one admin token in ``system:masters``),
  ``Node,RBAC`` authorization, default admission plugins, service-account tokens signed with an
  RSA key that ``openssl`` generates into ``<tmp>/pki/sa.key``.
* ``kube-controller-manager``: every default controller except the cloud ones, per-controller
  service-account credentials, the token controller (so each ServiceAccount gets a Secret of
  type ``kubernetes.io/service-account-token``), no leader election, HTTPS health on a free port.
* No scheduler and no kubelet: :class:`FakeNode` (a thread in the test process) binds pods to
  a fake Node and reports them Running/Ready with a unique ``127.0.0.x`` pod IP.

What the 1.20 controllers make of loopback pod IPs: the endpointslice controller writes
``discovery.k8s.io/v1beta1`` EndpointSlices with them (there is no ``discovery.k8s.io/v1`` before
1.21), while the endpoints controller cannot write v1 Endpoints at all (validation rejects
addresses in 127.0.0.0/8; it logs FailedToUpdateEndpoint events and retries with backoff).

Each process logs to ``<tmp>/<name>.log``; a start-up failure raises :class:`ControlPlaneError`
with the last 40 lines of that log. Every wait polls a condition every 50 ms up to a deadline.

How it stops: :meth:`ControlPlane.stop` sends SIGTERM to each process it started (by PID, in
reverse order), SIGKILL after a grace period, then removes the temporary directory. The
processes also get ``PR_SET_PDEATHSIG=SIGKILL``, so they die with the test process even when it
is killed outright (start the control plane from the main thread: the signal follows the thread
that forked).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

VERSION = "1.20.2"
CACHE_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "bazaar"
    / f"kubernetes-{VERSION}"
)
BIN_DIR = CACHE_DIR / "bin"
BUILD_SCRIPT = Path(__file__).with_name("build.sh")
POLL_S = 0.05
LOG_TAIL_LINES = 40
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
# Controllers that need a cloud provider (or are pointless without one).
CLOUD_CONTROLLERS = ("cloud-node-lifecycle", "route", "service")


class ControlPlaneError(RuntimeError):
    """A control-plane process failed to start or a wait ran past its deadline."""


def binaries_missing(bin_dir: Path = BIN_DIR) -> list[str]:
    """The binaries that ``build.sh`` has not (completely) built yet."""
    if not (bin_dir.parent / ".complete").is_file():
        return [str(bin_dir.parent / ".complete")]
    names = ("etcd", "kube-apiserver", "kube-controller-manager")
    return [str(bin_dir / n) for n in names if not os.access(bin_dir / n, os.X_OK)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(
    condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = POLL_S
) -> None:
    """Poll ``condition`` every ``poll_s`` until it holds; raise after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return
        if time.monotonic() >= deadline:
            raise ControlPlaneError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def close_api_client(api: client.ApiClient) -> None:
    """Close the client's thread pool and its pooled connections."""
    api.close()
    api.rest_client.pool_manager.clear()


_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def failed(self, why: str) -> ControlPlaneError:
        return ControlPlaneError(
            f"{self.name} {why}; the last {LOG_TAIL_LINES} lines of {self.log}:\n"
            f"{log_tail(self.log)}"
        )


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on loopback; a context manager.

    >>> with ControlPlane() as cp:
    ...     with cp.api_client() as api:
    ...         client.CoreV1Api(api).list_namespace()
    """

    def __init__(
        self,
        bin_dir: Path = BIN_DIR,
        workdir: Path | None = None,
        start_timeout_s: float = 60.0,
        stop_grace_s: float = 10.0,
    ) -> None:
        self.bin_dir = bin_dir
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="bazaar-controlplane-"))
        self.pki = self.workdir / "pki"
        self.admin_token = secrets.token_hex(16)
        self.apiserver_port = 0
        self.etcd_url = ""
        self.timings: dict[str, float] = {}
        self._processes: list[_Process] = []

    # ---------------------------------------------------------------- public surface

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def ca_file(self) -> Path:
        """The API server's self-signed certificate chain: verify its TLS with this."""
        return self.pki / "apiserver.crt"

    @property
    def kubeconfig(self) -> Path:
        """A kubeconfig for the admin (``system:masters``)."""
        return self.workdir / "admin.kubeconfig"

    def start(self) -> ControlPlane:
        missing = binaries_missing(self.bin_dir)
        if missing:
            raise ControlPlaneError(
                f"control-plane binaries missing ({', '.join(missing)}); run {BUILD_SCRIPT}"
            )
        began = time.monotonic()
        try:
            self.pki.mkdir(parents=True, exist_ok=True)
            self._generate_service_account_key()
            self._start_etcd()
            self.timings["etcd"] = time.monotonic() - began
            self._start_apiserver()
            self.timings["kube-apiserver"] = time.monotonic() - began
            self.kubeconfig_for_token(self.admin_token, self.kubeconfig)
            self._start_controller_manager()
            self.timings["kube-controller-manager"] = time.monotonic() - began
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM each process (newest first: controller-manager, API server, etcd) and wait
        for it, SIGKILL after the grace; then remove the temporary directory."""
        for proc in reversed(self._processes):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        self._processes.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def configuration(self, token: str | None = None) -> client.Configuration:
        config = client.Configuration()
        config.host = self.url
        config.ssl_ca_cert = str(self.ca_file)
        config.verify_ssl = True
        config.api_key = {"authorization": token or self.admin_token}
        config.api_key_prefix = {"authorization": "Bearer"}
        return config

    def api_client(self, token: str | None = None) -> client.ApiClient:
        """A client for the admin, or for ``token``; close it (or use it as a context manager)."""
        return client.ApiClient(self.configuration(token))

    def kubeconfig_for_token(self, token: str, path: Path | None = None) -> Path:
        """Write a kubeconfig (JSON, which kubectl reads as YAML) that authenticates with
        ``token``; returns its path."""
        if path is None:
            path = self.workdir / f"token-{secrets.token_hex(4)}.kubeconfig"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "bazaar",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [{"name": "bazaar", "context": {"cluster": "bazaar", "user": "user"}}],
            "current-context": "bazaar",
        }
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)
        return path

    def service_account_token(
        self, namespace: str, name: str, timeout_s: float = 30.0, create: bool = True
    ) -> str:
        """Create ServiceAccount ``namespace/name`` (unless it exists or ``create`` is False) and
        return the bearer token the token controller put into its Secret."""
        with self.api_client() as api:
            core = client.CoreV1Api(api)
            if create:
                body = client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))
                try:
                    core.create_namespaced_service_account(namespace, body)
                except ApiException as e:
                    if e.status != 409:
                        raise
            token: list[str] = []

            def secret_exists() -> bool:
                secret_list = core.list_namespaced_secret(
                    namespace, field_selector="type=kubernetes.io/service-account-token"
                )
                for s in secret_list.items:
                    annotations = s.metadata.annotations or {}
                    if annotations.get("kubernetes.io/service-account.name") == name and (
                        s.data or {}
                    ).get("token"):
                        token.append(base64.b64decode(s.data["token"]).decode())
                        return True
                return False

            wait_for(
                secret_exists, timeout_s, f"the token Secret of ServiceAccount {namespace}/{name}"
            )
            return token[0]

    # ---------------------------------------------------------------- processes

    def _spawn(self, name: str, argv: list[str]) -> _Process:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                preexec_fn=_die_with_parent,
            )
        proc = _Process(name, popen, log)
        self._processes.append(proc)
        return proc

    def _wait_ready(self, proc: _Process, check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            code = proc.popen.poll()
            if code is not None:
                raise proc.failed(f"exited with status {code} before {what}")
            if check():
                return
            if time.monotonic() >= deadline:
                raise proc.failed(f"was not ready after {self.start_timeout_s} s ({what})")
            time.sleep(POLL_S)

    def _generate_service_account_key(self) -> None:
        key = self.pki / "sa.key"
        subprocess.run(
            ["openssl", "genrsa", "-out", str(key), "2048"],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            ["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(self.pki / "sa.pub")],
            check=True,
            capture_output=True,
        )

    def _start_etcd(self) -> None:
        client_port, peer_port = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client_port}"
        peer = f"http://127.0.0.1:{peer_port}"
        proc = self._spawn(
            "etcd",
            [
                str(self.bin_dir / "etcd"),
                "--name=bazaar",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=bazaar={peer}",
                "--initial-cluster-state=new",
                "--log-level=warn",
                "--logger=zap",
            ],
        )

        def healthy() -> bool:
            status, body = _http_get(f"{self.etcd_url}/health")
            return status == 200 and json.loads(body or b"{}").get("health") == "true"

        self._wait_ready(proc, healthy, f"GET {self.etcd_url}/health")

    def _start_apiserver(self) -> None:
        self.apiserver_port = free_port()
        tokens = self.workdir / "tokens.csv"
        tokens.write_text(f'{self.admin_token},admin,admin,"system:masters"\n')
        tokens.chmod(0o600)
        proc = self._spawn(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.apiserver_port}",
                "--insecure-port=0",
                f"--cert-dir={self.pki}",
                f"--token-auth-file={tokens}",
                "--authorization-mode=Node,RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={self.pki / 'sa.pub'}",
                f"--service-account-signing-key-file={self.pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                # The "kubernetes" Endpoints would carry 127.0.0.1, which validation rejects.
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
        )

        def ready() -> bool:
            if not self.ca_file.is_file():  # written just before the server listens
                return False
            status, _ = _http_get(
                f"{self.url}/readyz", token=self.admin_token, ca_file=self.ca_file
            )
            return status == 200

        self._wait_ready(proc, ready, f"GET {self.url}/readyz")

    def _start_controller_manager(self) -> None:
        port = free_port()
        cert_dir = self.workdir / "controller-manager-pki"
        cert_dir.mkdir()
        controllers = ",".join(["*", *(f"-{c}" for c in CLOUD_CONTROLLERS)])
        proc = self._spawn(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                # No client-certificate or front-proxy authentication is configured, so there is
                # no extension-apiserver-authentication ConfigMap to look up.
                "--authentication-skip-lookup=true",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                "--port=0",
                f"--cert-dir={cert_dir}",
                f"--controllers={controllers}",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={self.pki / 'sa.key'}",
                f"--root-ca-file={self.ca_file}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--leader-elect=false",
                # FakeNode sends no heartbeats: keep the node lifecycle controller from marking
                # it NotReady (40 s by default) and evicting its pods.
                "--node-monitor-grace-period=24h",
                "--node-startup-grace-period=24h",
                "--pod-eviction-timeout=24h",
                # Client-side rate limits (20 QPS by default, shared per controller identity)
                # stretch start-up by seconds and delay controllers' reactions.
                "--kube-api-qps=1000",
                "--kube-api-burst=1000",
                # Tests create and delete namespaces and deployments quickly.
                "--concurrent-deployment-syncs=5",
                "--concurrent-replicaset-syncs=5",
                "--profiling=false",
                "--v=1",
            ],
        )
        health_url = f"https://127.0.0.1:{port}/healthz"
        ca = cert_dir / "kube-controller-manager.crt"

        def healthy() -> bool:
            if not ca.is_file():
                return False
            status, _ = _http_get(health_url, ca_file=ca, server_hostname="localhost")
            return status == 200

        self._wait_ready(proc, healthy, f"GET {health_url}")

        # The controllers are running once the default namespace has its ServiceAccount and
        # the token controller has issued that account's token.
        with self.api_client() as api:
            core = client.CoreV1Api(api)

            def default_account_has_token() -> bool:
                try:
                    sa = core.read_namespaced_service_account("default", "default")
                except ApiException as e:
                    if e.status == 404:
                        return False
                    raise
                return bool(sa.secrets)

            self._wait_ready(
                proc, default_account_has_token, "the token of ServiceAccount default/default"
            )


def _http_get(
    url: str,
    token: str | None = None,
    ca_file: Path | None = None,
    server_hostname: str | None = None,
) -> tuple[int, bytes]:
    """GET ``url`` with the stdlib; (0, b"") when nothing answers yet."""
    scheme, _, rest = url.partition("://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    conn: http.client.HTTPConnection | None = None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        if scheme == "https":
            # Inside the try: a CA file being written right now fails to load (ssl.SSLError).
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            conn = _HTTPSConnection(host, int(port), context, server_hostname)
        else:
            conn = http.client.HTTPConnection(host, int(port), timeout=2)
        conn.request("GET", "/" + path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return 0, b""
    finally:
        if conn is not None:
            conn.close()


class _HTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an IP whose certificate is issued for a name (``server_hostname``)."""

    def __init__(
        self, host: str, port: int, context: ssl.SSLContext, server_hostname: str | None
    ) -> None:
        super().__init__(host, port, timeout=2, context=context)
        self._context = context
        self._server_hostname = server_hostname or host

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self._server_hostname)


# ==================================================================== the fake kubelet


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _PodState:
    ip: str
    pod: client.V1Pod
    ready: bool = False
    finalised: bool = False  # on_delete has been called
    reported: tuple[str, bool] | None = None  # (ip, ready) last written to the API


@dataclass
class FakeNode:
    """A kubelet stand-in: registers Node ``name`` (Ready) and, in a background thread, binds
    pending pods to it (there is no scheduler), gives each a unique ``127.0.0.x`` pod IP, and
    reports them Running and Ready; pods being deleted are finalised (deleted with grace 0).

    ``namespaces``: the namespaces it handles (None: all; two FakeNodes must not share a
    namespace, and pod IPs are unique per FakeNode). ``on_pod(pod) -> bool``: called in the
    FakeNode's thread on every poll for a bound pod until it returns True, with
    ``pod.status.pod_ip`` already set to its IP; the pod is reported Running but not Ready until
    then (start a real process on that IP the first time, return True once it serves; keep it
    quick). ``on_delete(pod)``: called once when such a pod is finalised or has vanished. The
    thread polls every ``poll_s``; :meth:`stop` wakes it at once, joins it, and re-raises the
    first exception the thread hit (an API error, or one from a hook).
    """

    control_plane: ControlPlane
    name: str = "bazaar-node"
    namespaces: Iterable[str] | None = None
    on_pod: Callable[[client.V1Pod], bool] | None = None
    on_delete: Callable[[client.V1Pod], None] | None = None
    poll_s: float = POLL_S
    delete_node_on_stop: bool = True

    _pods: dict[str, _PodState] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _free_ips: list[int] = field(default_factory=lambda: list(range(2, 255)), init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _api: client.ApiClient | None = field(default=None, init=False)
    errors: list[BaseException] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.namespaces is not None:
            self.namespaces = frozenset(self.namespaces)

    def start(self) -> FakeNode:
        self._api = self.control_plane.api_client()
        self._register()
        self._thread = threading.Thread(target=self._run, name=f"FakeNode({self.name})")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                raise ControlPlaneError(f"FakeNode {self.name} did not stop within 30 s")
            self._thread = None
        if self._api is not None:
            if self.delete_node_on_stop:
                with contextlib.suppress(ApiException):
                    client.CoreV1Api(self._api).delete_node(self.name)
            close_api_client(self._api)
            self._api = None
        if self.errors:
            raise ControlPlaneError(f"FakeNode {self.name} failed: {self.errors[0]!r}") from (
                self.errors[0]
            )

    def __enter__(self) -> FakeNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pod_ips(self) -> dict[str, str]:
        """``namespace/name`` -> pod IP of the pods it currently runs (a snapshot)."""
        with self._lock:
            return {key.split("@")[0]: state.ip for key, state in self._pods.items()}

    # ---------------------------------------------------------------- internals

    def _register(self) -> None:
        assert self._api is not None
        core = client.CoreV1Api(self._api)
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            },
            "status": self._node_status(),
        }
        try:
            core.create_node(node)
        except ApiException as e:
            if e.status != 409:
                raise
        # Status sent with a create is kept for Nodes, but say it again to be sure.
        core.patch_node_status(self.name, {"status": self._node_status()})

    def _node_status(self) -> dict[str, Any]:
        now = _now()
        resources = {"cpu": "64", "memory": "256Gi", "pods": "250", "ephemeral-storage": "1Ti"}

        def condition(kind: str, status: str, reason: str) -> dict[str, str]:
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": "bazaar FakeNode",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }

        return {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.name},
            ],
            "conditions": [
                condition("Ready", "True", "KubeletReady"),
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID"),
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": f"v{VERSION}",
                "kubeProxyVersion": f"v{VERSION}",
                "containerRuntimeVersion": "fake://0",
                "osImage": "bazaar FakeNode",
                "kernelVersion": "",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }

    def _run(self) -> None:
        assert self._api is not None
        core = client.CoreV1Api(self._api)
        while not self._stop.is_set():
            try:
                self._sync(core)
            except BaseException as e:  # surfaced by stop(); the thread must not die silently
                self.errors.append(e)
                return
            self._stop.wait(self.poll_s)

    def _handles(self, pod: client.V1Pod) -> bool:
        if self.namespaces is not None and pod.metadata.namespace not in self.namespaces:
            return False
        return pod.spec.node_name in (None, "", self.name)

    def _sync(self, core: client.CoreV1Api) -> None:
        pods = [p for p in core.list_pod_for_all_namespaces().items if self._handles(p)]
        present = {self._key(p) for p in pods}
        for key in [k for k in self._pods if k not in present]:  # deleted by someone else
            state = self._release(key)
            if self.on_delete is not None and not state.finalised:
                self.on_delete(state.pod)
        for pod in pods:
            if self._stop.is_set():
                return
            try:
                self._sync_pod(core, pod)
            except ApiException as e:
                # 404: the pod went away meanwhile; 409: it changed; the next poll sees it.
                if e.status not in (404, 409):
                    raise

    @staticmethod
    def _key(pod: client.V1Pod) -> str:
        return f"{pod.metadata.namespace}/{pod.metadata.name}@{pod.metadata.uid}"

    def _release(self, key: str) -> _PodState:
        with self._lock:
            state = self._pods.pop(key)
            self._free_ips.append(int(state.ip.rsplit(".", 1)[1]))
            self._free_ips.sort()
        return state

    def _sync_pod(self, core: client.CoreV1Api, pod: client.V1Pod) -> None:
        meta = pod.metadata
        key = self._key(pod)
        if meta.deletion_timestamp is not None:
            self._finalise(core, pod, key)
            return
        if not pod.spec.node_name:
            binding = {
                "apiVersion": "v1",
                "kind": "Binding",
                "metadata": {"name": meta.name, "namespace": meta.namespace},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.name},
            }
            # _preload_content=False: the response is a Status, which the client would fail to
            # deserialise as a V1Binding.
            response = core.create_namespaced_pod_binding(
                meta.name, meta.namespace, binding, _preload_content=False
            )
            response.release_conn()
            return
        state = self._pods.get(key)
        if state is None:
            if not self._free_ips:
                raise ControlPlaneError(f"FakeNode {self.name}: no free 127.0.0.x pod IP")
            with self._lock:
                ip = f"127.0.0.{self._free_ips.pop(0)}"
                state = self._pods[key] = _PodState(ip=ip, pod=pod)
        state.pod = pod
        if not state.ready:
            if self.on_pod is None:
                state.ready = True
            else:
                pod.status = pod.status or client.V1PodStatus()
                pod.status.pod_ip = state.ip
                pod.status.pod_ips = [client.V1PodIP(ip=state.ip)]
                state.ready = bool(self.on_pod(pod))
        if state.reported != (state.ip, state.ready):
            core.patch_namespaced_pod_status(
                meta.name, meta.namespace, {"status": self._pod_status(pod, state)}
            )
            state.reported = (state.ip, state.ready)

    def _pod_status(self, pod: client.V1Pod, state: _PodState) -> dict[str, Any]:
        now = _now()
        ready = "True" if state.ready else "False"
        started = (pod.status.start_time if pod.status else None) or now
        if isinstance(started, datetime):
            started = started.strftime("%Y-%m-%dT%H:%M:%SZ")

        def condition(kind: str, status: str) -> dict[str, str]:
            return {"type": kind, "status": status, "lastTransitionTime": now}

        return {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "podIP": state.ip,
            "podIPs": [{"ip": state.ip}],
            "startTime": started,
            "conditions": [
                condition("PodScheduled", "True"),
                condition("Initialized", "True"),
                condition("ContainersReady", ready),
                condition("Ready", ready),
            ],
            "containerStatuses": [
                {
                    "name": c.name,
                    "image": c.image,
                    "imageID": f"fake://{c.image}",
                    "containerID": f"fake://{pod.metadata.uid}/{c.name}",
                    "ready": state.ready,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": started}},
                }
                for c in pod.spec.containers
            ],
        }

    def _finalise(self, core: client.CoreV1Api, pod: client.V1Pod, key: str) -> None:
        meta = pod.metadata
        state = self._pods.get(key)
        if state is not None:
            if self.on_delete is not None and not state.finalised:
                self.on_delete(pod)
            state.finalised = True
            now = _now()
            core.patch_namespaced_pod_status(
                meta.name,
                meta.namespace,
                {
                    "status": {
                        "conditions": [
                            {
                                "type": "ContainersReady",
                                "status": "False",
                                "lastTransitionTime": now,
                            },
                            {"type": "Ready", "status": "False", "lastTransitionTime": now},
                        ],
                        "containerStatuses": [
                            {
                                "name": c.name,
                                "ready": False,
                                "state": {
                                    "running": None,  # null deletes it in a merge patch
                                    "terminated": {
                                        "exitCode": 0,
                                        "reason": "Completed",
                                        "finishedAt": now,
                                    },
                                },
                            }
                            for c in pod.spec.containers
                        ],
                    }
                },
            )
        core.delete_namespaced_pod(
            meta.name,
            meta.namespace,
            body=client.V1DeleteOptions(
                grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta.uid)
            ),
        )
        if state is not None:
            self._release(key)


@contextlib.contextmanager
def fake_node(control_plane: ControlPlane, **kwargs: Any) -> Iterator[FakeNode]:
    """``with fake_node(cp) as node:``: a started :class:`FakeNode`, stopped afterwards."""
    node = FakeNode(control_plane, **kwargs).start()
    try:
        yield node
    finally:
        node.stop()
