"""The error tree shared by the gateway and the pods.

Every failure a client can see is a ``BazaarError``: the subclass fixes the HTTP status and
whether retrying can help, and builds its own message from its arguments. Servers map these
to ``{"error": "..."}`` bodies in one place (``error_status_and_headers``); anything else that
escapes a handler is a bug and answers 500.
"""

from __future__ import annotations

import math
from typing import ClassVar


class BazaarError(Exception):
    """Base of every error a client may see."""

    status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(BazaarError):
    """The request is malformed or does not match the model (400)."""

    status = 400


class TooCostlyToDecode(InvalidRequest):
    """Decoding the request would take more memory than its size allows (413); an
    ``InvalidRequest`` still, so the codec's callers catch one class."""

    status = 413

    def __init__(self, what: str, allowed_bytes: int, advice: str) -> None:
        super().__init__(
            f"{what} would take more than the {allowed_bytes / 2**20:,.0f} MiB allowed for "
            f"its size to decode; {advice}"
        )


class PayloadTooLarge(BazaarError):
    """The request body exceeds what the server reads into memory (413)."""

    status = 413

    def __init__(self, limit_bytes: int, what: str = "request body") -> None:
        super().__init__(f"{what} is larger than the limit of {limit_bytes} bytes")


class UnsupportedEncoding(InvalidRequest):
    """A ``Content-Encoding`` the server cannot decode (415, as RFC 7694 says)."""

    status = 415

    def __init__(self, encoding: str, supported: str) -> None:
        super().__init__(f"Content-Encoding {encoding!r} is not supported; send {supported}")


class ConfigError(BazaarError):
    """A model repository or configuration value is invalid (400 when it came over the API)."""

    status = 400

    def __init__(self, where: str, key: str | None, problem: str) -> None:
        where_key = f"{where}: {key}" if key else where
        super().__init__(f"{where_key}: {problem}")
        self.where = where
        self.key = key


class ModelNotFound(BazaarError):
    """No such model, or no such version of it (404)."""

    status = 404

    def __init__(self, name: str, version: str | None = None) -> None:
        if version is None:
            super().__init__(f"unknown model '{name}'")
        else:
            super().__init__(f"unknown version '{version}' of model '{name}'")


class ModelNotReady(BazaarError):
    """The model exists but cannot serve now (503)."""

    status = 503
    retryable = True

    def __init__(self, name: str, reason: str = "not ready") -> None:
        super().__init__(f"model '{name}' is {reason}")


class Overloaded(BazaarError):
    """The queue is full; retry after the estimated drain time (503 with Retry-After)."""

    status = 503
    retryable = True

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class QuotaExceeded(BazaarError):
    """The caller's tenant is over a quota, ``quota`` names which (429, Retry-After)."""

    status = 429

    def __init__(self, message: str, quota: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.quota = quota
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class DeadlineExceeded(BazaarError):
    """The request's deadline passed before it could be answered (504)."""

    status = 504


class UpstreamError(BazaarError):
    """A model pod failed or could not be reached (502)."""

    status = 502
    retryable = True


class InferenceFailed(BazaarError):
    """The runtime failed on input that passed validation: the server's fault (500)."""

    status = 500
