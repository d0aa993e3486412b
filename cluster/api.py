"""The connection to the Kubernetes API: the client, the one retry policy, the permission log.

``connect`` builds the official client's ``ApiClient`` (in-cluster inside a pod, else a
kubeconfig) with urllib3's own retries off, so ``Cluster.call`` is the only retry policy:

- 409, 429, 5xx, timeouts and connection errors are retried with exponential backoff
  (``backoff_s``, doubling) up to ``attempts`` tries; then ``KubernetesError``, whose message
  names the call and the last problem.
- 403 is never retried: ``PermissionLog`` logs it once, naming the verb and resource to grant
  to the caller's ServiceAccount, until a call with that permission succeeds again, and the
  call raises ``Forbidden`` so the caller can do without.

The client blocks (urllib3), so every call runs in a thread with a per-request timeout; a
caller that is cancelled abandons the call in its thread, bounded by that timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import urllib3
from kubernetes import config
from kubernetes.client import ApiClient, Configuration
from kubernetes.client.exceptions import ApiException

from protocol.errors import ConfigError
from protocol.support import ProblemLog

T = TypeVar("T")

RETRYABLE_STATUS = frozenset({409, 429, 500, 502, 503, 504})

# kubernetes.config carries no annotations; these say what the calls below rely on.
_load_incluster_config: Callable[..., None] = config.load_incluster_config
_load_kube_config: Callable[..., None] = config.load_kube_config


@dataclass(frozen=True, slots=True)
class Permission:
    """One RBAC rule item: ``verb`` on ``resource`` in ``api_group`` ("" is the core group)."""

    api_group: str
    resource: str
    verb: str


class Forbidden(Exception):
    """RBAC refused a call; already logged by ``PermissionLog``."""


class KubernetesError(Exception):
    """A call failed for good: retries spent, or a status that retrying cannot fix."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        """The API's HTTP status, None when no answer came (timeout, refused)."""


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
    configuration.retries = False  # Cluster.call is the one retry policy
    return ApiClient(configuration)


def pod_url(ip: str, port: int) -> str:
    """A pod's base URL (IPv6 addresses in brackets)."""
    return f"http://{pod_address(ip, port)}"


def pod_address(ip: str, port: int) -> str:
    """A pod's ``host:port``, as a gRPC target (IPv6 addresses in brackets)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class PermissionLog:
    """RBAC refusals, each logged once while it lasts (again if it comes back after working).

    ``account`` names the ServiceAccount to grant, ``logger`` the module speaking.
    """

    def __init__(self, namespace: str, account: str, logger: logging.Logger) -> None:
        self.namespace = namespace
        self.account = account
        self._denied = ProblemLog(logger, logging.ERROR)

    def denied(self, permission: Permission) -> None:
        group = permission.api_group or '"" (core)'
        self._denied.failing(
            permission,
            f"RBAC: cannot {permission.verb} {permission.resource} in namespace "
            f"{self.namespace}; grant verbs [{permission.verb}] on {permission.resource} "
            f"(apiGroup {group}) to the {self.account}'s ServiceAccount",
        )

    def allowed(self, permission: Permission) -> None:
        self._denied.ok(permission)


class Cluster:
    """One namespace of one API server, as one caller (``account``) sees it.

    It owns its ``ApiClient`` (``connect()``'s when none is given): ``close()`` closes it.
    """

    def __init__(
        self,
        namespace: str,
        account: str,
        logger: logging.Logger,
        api_client: ApiClient | None = None,
        *,
        request_timeout_s: float = 5.0,
        attempts: int = 3,
        backoff_s: float = 0.2,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.namespace = namespace
        self.client = api_client if api_client is not None else connect()
        self.request_timeout_s = request_timeout_s
        """Per-request timeout, passed to every call as ``_request_timeout``."""
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.sleep = sleep
        self.log = logger
        self._permissions = PermissionLog(namespace, account, logger)

    async def call(
        self,
        permission: Permission,
        request: Callable[[], T],
        retryable: frozenset[int] = RETRYABLE_STATUS,
    ) -> T:
        """``request()`` in a thread, retried with backoff while a retry can help.

        Raises ``Forbidden`` on 403 (logged once), ``KubernetesError`` when retries are spent
        or cannot help. A write guarded by a resourceVersion passes ``retryable`` without
        409: repeating it cannot succeed.
        """
        what = f"{permission.verb} {permission.resource} in namespace {self.namespace}"
        attempt = 1
        while True:
            try:
                result = await asyncio.to_thread(request)
            except ApiException as exc:
                if exc.status == 403:
                    self._permissions.denied(permission)
                    raise Forbidden from None
                problem = f"{exc.status} {exc.reason}"
                if exc.status not in retryable or attempt == self.attempts:
                    raise KubernetesError(f"cannot {what}: {problem}", exc.status) from None
            except urllib3.exceptions.HTTPError as exc:
                problem = str(exc) or type(exc).__name__
                if attempt == self.attempts:
                    raise KubernetesError(f"cannot {what}: {problem}") from None
            else:
                self._permissions.allowed(permission)
                return result
            delay = self.backoff_s * 2 ** (attempt - 1)
            self.log.debug(
                "%s failed (%s); attempt %d in %.2f s", what, problem, attempt + 1, delay
            )
            await self.sleep(delay)
            attempt += 1

    def close(self) -> None:
        self.client.close()  # type: ignore[no-untyped-call]
