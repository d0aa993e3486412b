"""The Kubernetes scaler: model Deployments, read and scaled through ``apps/v1`` ``/scale``.

The only module that imports ``kubernetes``. Every tick ``targets()`` lists the Deployments
in one namespace that carry the model label (``bazaar.dev/model=<model>``), and for each:
parses its ``bazaar.dev/*`` annotations into a ``ScaleConfig``, reads
``deployments/{name}/scale`` for the replicas asked for, takes the ready count from the
Deployment's status, and lists its pods (by the Deployment's selector) for the ready pods'
URLs. ``scale()`` sends a JSON merge patch ``{"spec": {"replicas": N}}`` to the same
``/scale`` subresource, so the autoscaler needs no write access to the Deployment itself.
``REQUIRED_RBAC`` is exactly what these calls need; the Role in ``deploy/`` grants it and a
test holds the two together.

The client is blocking (urllib3), so every call runs in a thread (``asyncio.to_thread``)
with a per-request timeout. Failures:

- 403: logged once per permission, naming the verb and resource to grant, until a call
  with that permission succeeds again; the scaler then does without (no targets, no pod
  URLs, no scaling) and never raises for it.
- 409, 429, 5xx, timeouts, connection errors: retried with exponential backoff, a bounded
  number of attempts per call; urllib3's own retries are off, so this is the only retry
  policy. When the last attempt fails: listing the Deployments or patching raises
  ``KubernetesError`` (a ``ScalerError``), which the loop logs before going on; reading one
  Deployment's scale skips that model for the tick; listing its pods leaves its pod
  signals missing.
- A Deployment with bad annotations, or a model label on two Deployments, is skipped and
  logged once per distinct problem.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import urllib3
from kubernetes import config
from kubernetes.client import ApiClient, AppsV1Api, Configuration, CoreV1Api
from kubernetes.client.exceptions import ApiException
from kubernetes.client.models import V1Deployment, V1LabelSelector, V1Pod

from autoscaler.annotations import scale_config
from autoscaler.loop import ScalerError, ScaleTarget
from gateway.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

MERGE_PATCH = "application/merge-patch+json"
RETRYABLE_STATUS = frozenset({409, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class Permission:
    """One RBAC rule item: ``verb`` on ``resource`` in ``api_group`` ("" is the core group)."""

    api_group: str
    resource: str
    verb: str


LIST_DEPLOYMENTS = Permission("apps", "deployments", "list")
GET_SCALE = Permission("apps", "deployments/scale", "get")
PATCH_SCALE = Permission("apps", "deployments/scale", "patch")
LIST_PODS = Permission("", "pods", "list")
REQUIRED_RBAC = frozenset({LIST_DEPLOYMENTS, GET_SCALE, PATCH_SCALE, LIST_PODS})
"""Every (apiGroup, resource, verb) this module calls; the autoscaler's Role grants these."""


class KubernetesError(ScalerError):
    """A Kubernetes API call failed for good (after retries, or with a status retries can't fix)."""


# kubernetes.config carries no annotations; these say what the calls below rely on.
_load_incluster_config: Callable[..., None] = config.load_incluster_config
_load_kube_config: Callable[..., None] = config.load_kube_config


class Forbidden(Exception):
    """RBAC refused a call; already logged by ``PermissionLog``."""


class PermissionLog:
    """RBAC refusals, each logged once while it lasts (again if it comes back after working).

    Shared by the autoscaler and the gateway's endpoint discovery: ``account`` names the
    ServiceAccount to grant, ``logger`` the module speaking.
    """

    def __init__(self, namespace: str, account: str, logger: logging.Logger) -> None:
        self.namespace = namespace
        self.account = account
        self.logger = logger
        self._denied: set[Permission] = set()

    async def call(self, permission: Permission, request: Callable[[], T]) -> T:
        """``request()`` in a thread (the client blocks); a 403 is logged once and raised as
        ``Forbidden``, any other failure raised as it is."""
        try:
            result = await asyncio.to_thread(request)
        except ApiException as exc:
            if exc.status == 403:
                self._deny(permission)
                raise Forbidden from None
            raise
        self._denied.discard(permission)
        return result

    def _deny(self, permission: Permission) -> None:
        if permission in self._denied:
            return
        self._denied.add(permission)
        self.logger.error(
            "RBAC: cannot %s %s in namespace %s; grant verbs [%s] on %s (apiGroup %s) "
            "to the %s's ServiceAccount",
            permission.verb,
            permission.resource,
            self.namespace,
            permission.verb,
            permission.resource,
            permission.api_group or '"" (core)',
            self.account,
        )


def pod_url(ip: str, port: int) -> str:
    """A pod's base URL (IPv6 addresses in brackets)."""
    return f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}"


def connect(kubeconfig: str | None = None) -> ApiClient:
    """A client configured in-cluster inside a pod, else from the kubeconfig (``kubeconfig``
    or ``~/.kube/config``); ``ConfigError`` when neither works."""
    configuration = Configuration()
    try:
        if kubeconfig is None:
            try:
                _load_incluster_config(client_configuration=configuration)
            except config.ConfigException:
                _load_kube_config(client_configuration=configuration)
        else:
            _load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    except (config.ConfigException, OSError) as exc:
        where = kubeconfig or "kubernetes configuration (in-cluster, else ~/.kube/config)"
        raise ConfigError(where, None, str(exc)) from None
    configuration.retries = False  # our backoff is the one retry policy
    return ApiClient(configuration)


class KubernetesScaler:
    """A ``Scaler`` over the model Deployments of one namespace. It owns its API client:
    ``close()`` closes it (and its connection pool)."""

    def __init__(
        self,
        namespace: str,
        selector: str = "bazaar.dev/model",
        api_client: ApiClient | None = None,
        *,
        request_timeout_s: float = 5.0,
        attempts: int = 3,
        backoff_s: float = 0.2,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.namespace = namespace
        self.selector = selector
        """The label key whose value names the model."""
        self.client = api_client if api_client is not None else connect()
        self.request_timeout_s = request_timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.sleep = sleep
        self._apps = AppsV1Api(self.client)
        self._core = CoreV1Api(self.client)
        self._deployments: dict[str, str] = {}
        """Model → Deployment name, from the last listing."""
        self._permissions = PermissionLog(namespace, "autoscaler", log)
        self._problems: set[str] = set()

    def close(self) -> None:
        self.client.close()  # type: ignore[no-untyped-call]

    async def targets(self) -> list[ScaleTarget]:
        timeout = self.request_timeout_s
        try:
            listing = await self._call(
                LIST_DEPLOYMENTS,
                lambda: self._apps.list_namespaced_deployment(
                    self.namespace, label_selector=self.selector, _request_timeout=timeout
                ),
            )
        except Forbidden:
            return []
        by_model: dict[str, list[V1Deployment]] = {}
        for deployment in listing.items:
            model = ((deployment.metadata and deployment.metadata.labels) or {}).get(self.selector)
            if model:
                by_model.setdefault(model, []).append(deployment)
        unique = {}
        problems = set()
        for model, deployments in sorted(by_model.items()):
            if len(deployments) == 1:
                unique[model] = deployments[0]
                continue
            names = ", ".join(sorted(_name(deployment) for deployment in deployments))
            problems.add(
                f"model {model!r} is on several Deployments ({names}) in namespace "
                f"{self.namespace}; none of them is scaled until one remains"
            )
        found = await asyncio.gather(
            *(self._target(model, deployment, problems) for model, deployment in unique.items())
        )
        self._report(problems)
        self._deployments = {model: _name(unique[model]) for model in unique}
        return [target for target in found if target is not None]

    async def scale(self, model: str, replicas: int, reason: str) -> None:
        name = self._deployments.get(model)
        if name is None:
            raise KubernetesError(f"no Deployment for model {model!r} in the last listing")
        timeout = self.request_timeout_s
        try:
            await self._call(
                PATCH_SCALE,
                lambda: self._apps.patch_namespaced_deployment_scale(
                    name,
                    self.namespace,
                    {"spec": {"replicas": replicas}},
                    _content_type=MERGE_PATCH,
                    _request_timeout=timeout,
                ),
            )
        except Forbidden:
            return
        log.debug("scaled deployment %s/%s to %d: %s", self.namespace, name, replicas, reason)

    async def _target(
        self, model: str, deployment: V1Deployment, problems: set[str]
    ) -> ScaleTarget | None:
        name = _name(deployment)
        annotations = (deployment.metadata and deployment.metadata.annotations) or {}
        try:
            scale_settings = scale_config(annotations, f"deployment {self.namespace}/{name}")
        except ConfigError as exc:
            problems.add(f"{exc}; the model is not scaled until this is fixed")
            return None
        timeout = self.request_timeout_s
        try:
            scale = await self._call(
                GET_SCALE,
                lambda: self._apps.read_namespaced_deployment_scale(
                    name, self.namespace, _request_timeout=timeout
                ),
            )
        except Forbidden:
            return None
        except KubernetesError as exc:
            log.warning("%s; model %s is skipped this tick", exc, model)
            return None
        replicas = (scale.spec and scale.spec.replicas) or 0
        ready = (deployment.status and deployment.status.ready_replicas) or 0
        return ScaleTarget(
            model=model,
            config=scale_settings,
            replicas=replicas,
            ready_replicas=ready,
            starting_replicas=max(0, replicas - ready),
            pod_urls=await self._pod_urls(deployment),
        )

    async def _pod_urls(self, deployment: V1Deployment) -> tuple[str, ...]:
        """``http://ip:port`` of the Deployment's ready pods; the port is its container's
        port named ``http``, else its first container port."""
        spec = deployment.spec
        if spec is None:
            return ()
        port = _http_port(deployment)
        if port is None:
            return ()
        timeout = self.request_timeout_s
        try:
            pods = await self._call(
                LIST_PODS,
                lambda: self._core.list_namespaced_pod(
                    self.namespace,
                    label_selector=_selector_string(spec.selector),
                    _request_timeout=timeout,
                ),
            )
        except Forbidden:
            return ()
        except KubernetesError as exc:
            log.warning("%s; the pods' signals are missing this tick", exc)
            return ()
        urls = []
        for pod in pods.items:
            ip = _ready_ip(pod)
            if ip is not None:
                urls.append(pod_url(ip, port))
        return tuple(sorted(urls))

    async def _call(self, permission: Permission, request: Callable[[], T]) -> T:
        """``request()`` through the permission log, retried with backoff when a retry can
        help; ``KubernetesError`` when retries are spent or cannot help."""
        what = f"{permission.verb} {permission.resource} in namespace {self.namespace}"
        attempt = 1
        while True:
            try:
                return await self._permissions.call(permission, request)
            except ApiException as exc:
                problem = f"{exc.status} {exc.reason}"
                if exc.status not in RETRYABLE_STATUS or attempt == self.attempts:
                    raise KubernetesError(f"cannot {what}: {problem}") from None
            except urllib3.exceptions.HTTPError as exc:
                problem = str(exc) or type(exc).__name__
                if attempt == self.attempts:
                    raise KubernetesError(f"cannot {what}: {problem}") from None
            delay = self.backoff_s * 2 ** (attempt - 1)
            log.debug("%s failed (%s); attempt %d in %.2f s", what, problem, attempt + 1, delay)
            await self.sleep(delay)
            attempt += 1

    def _report(self, problems: set[str]) -> None:
        """Log each problem once, while it lasts."""
        for problem in sorted(problems - self._problems):
            log.error("%s", problem)
        self._problems = problems


def _name(deployment: V1Deployment) -> str:
    return (deployment.metadata and deployment.metadata.name) or "?"


def _http_port(deployment: V1Deployment) -> int | None:
    pod_spec = deployment.spec and deployment.spec.template.spec
    containers = pod_spec.containers if pod_spec else []
    ports = [port for container in containers for port in container.ports or []]
    for port in ports:
        if port.name == "http":
            return port.container_port
    return ports[0].container_port if ports else None


def _selector_string(selector: V1LabelSelector) -> str:
    """A LabelSelector in the ``labelSelector`` query syntax."""
    terms = [f"{key}={value}" for key, value in sorted((selector.match_labels or {}).items())]
    for expression in selector.match_expressions or []:
        values = ",".join(expression.values or [])
        terms.append(
            {
                "In": f"{expression.key} in ({values})",
                "NotIn": f"{expression.key} notin ({values})",
                "Exists": expression.key,
                "DoesNotExist": f"!{expression.key}",
            }[expression.operator]
        )
    return ",".join(terms)


def _ready_ip(pod: V1Pod) -> str | None:
    """The pod's IP if it is serving: not terminating, and its Ready condition is True."""
    if pod.metadata is not None and pod.metadata.deletion_timestamp is not None:
        return None
    status = pod.status
    if status is None or not status.pod_ip:
        return None
    ready = any(
        condition.type == "Ready" and condition.status == "True"
        for condition in status.conditions or []
    )
    return status.pod_ip if ready else None
