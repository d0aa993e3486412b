"""Every replica behind one URL: what the autoscaler reads demand from and what the gateway
deciding rollouts reads its peers' samples from (``GET /stats`` of each gateway).

A URL whose host name resolves to several addresses (a headless Service, such as
``bazaar-gateway-stats``) stands for one replica per address, so each is read rather than
one picked by a load balancer; one that resolves to a single address, or not at all, is
itself (a failed resolution fails the request made to it, which then says why).
"""

from __future__ import annotations

import asyncio
import socket
from urllib.parse import urlsplit


async def replica_urls(url: str) -> list[str]:
    """One URL per address the host resolves to (every replica of a headless Service)."""
    parts = urlsplit(url)
    if parts.hostname is None:
        return [url]
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            parts.hostname, port, type=socket.SOCK_STREAM
        )
    except OSError:
        return [url]  # the request fails too, and says why
    addresses = sorted({str(info[4][0]) for info in infos})
    if len(addresses) <= 1:
        return [url]
    return [
        f"{parts.scheme}://{f'[{address}]' if ':' in address else address}:{port}{parts.path}"
        for address in addresses
    ]
