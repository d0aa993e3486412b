"""The other gateways' rollout samples, which the deciding gateway adds to its own.

Every gateway replica sees only the requests sent to it, so the one deciding rollouts
(``gateway.rollout_record``) reads, before each judgement, the ``/stats`` of every gateway
behind ``urls`` (found as the autoscaler finds them: a headless Service's name resolves to
one address per ready replica, ``protocol.replicas``) and takes each model's
``rollout.sample`` (``gateway.rollout.Rollout.published``). Its own address is among them:
it knows itself by the ``instance`` its ``/stats`` carries, and skips that answer.

A gateway that does not answer in ``timeout_s`` (or answers an error, or more than
``MAX_STATS_BYTES``, or nonsense) makes the whole read None: the decider then holds, since
a judgement on part of the samples could pass a candidate whose failures are all at the
missing gateway. The failure is logged once while it lasts. A replica that is gone leaves
the headless Service's addresses when it stops being ready, so a hold lasts seconds. No
Kubernetes permission is needed: the addresses come from DNS, the samples over HTTP (with
``headers``, a bearer token where the gateways require API keys, scope ``stats``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import orjson

from protocol.replicas import replica_urls
from protocol.support import ProblemLog

log = logging.getLogger(__name__)

MAX_STATS_BYTES = 8 * 1024 * 1024
"""The largest ``/stats`` answer read from a peer."""


class RolloutPeers:
    def __init__(
        self, urls: Sequence[str], headers: Mapping[str, str] | None = None, timeout_s: float = 1.0
    ) -> None:
        self.urls = [url.rstrip("/") for url in urls]
        self.headers = dict(headers or {})
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._problems = ProblemLog(log)

    async def read(self, instance: str) -> dict[str, list[Any]] | None:
        """Per model, the samples every gateway but ``instance`` publishes; None when one of
        them did not answer."""
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self.headers)
        resolved = await asyncio.gather(*map(replica_urls, self.urls))
        replicas = list(dict.fromkeys(url for urls in resolved for url in urls))
        answers = await asyncio.gather(*(self._stats(self._session, url) for url in replicas))
        published: dict[str, list[Any]] = {}
        for answer in answers:
            if answer is None:
                return None
            if answer.get("instance") == instance:
                continue
            for model, stats in answer["models"].items():
                rollout = stats.get("rollout")
                sample = rollout.get("sample") if isinstance(rollout, dict) else None
                if sample is not None:
                    published.setdefault(model, []).append(sample)
        return published

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _stats(self, session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
        try:
            async with session.get(f"{url}/stats", timeout=self.timeout) as response:
                response.raise_for_status()
                body = await response.content.read(MAX_STATS_BYTES + 1)
            if len(body) > MAX_STATS_BYTES:
                raise ValueError(f"its /stats is over {MAX_STATS_BYTES} bytes")
            stats = orjson.loads(body)
            if not isinstance(stats, dict) or not isinstance(stats.get("models"), dict):
                raise ValueError("its /stats has no models")
            if not all(isinstance(of_model, dict) for of_model in stats["models"].values()):
                raise ValueError("its /stats has a model that is not an object")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # orjson's errors too
            problem = f"gateway {url}: no rollout samples, rollouts hold meanwhile: {exc!r}"
            self._problems.failing(url, problem)
            return None
        self._problems.ok(url, f"gateway {url}: its rollout samples are read again")
        return stats
