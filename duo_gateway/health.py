"""Readiness probes: is each configured peer reachable right now?

/readyz reports every peer, but only the dependencies without which DUO can disclose nothing (Mitz
and the audit trail) make it "not ready": one hospital's PACS being down must not take the whole
gateway out of a load balancer, it makes that hospital's answers PartialSuccess instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from duo_gateway.config.loader import DuoConfig
from duo_gateway.config.tls import ClientTls
from duo_gateway.dicom.echo import c_echo
from duo_gateway.tls import client_context


@dataclass(frozen=True)
class ProbeResult:
    peer: str
    kind: str
    essential: bool
    ok: bool
    detail: str
    elapsed_ms: float

    def as_json(self) -> dict[str, Any]:
        return {"peer": self.peer, "kind": self.kind, "essential": self.essential, "ok": self.ok,
                "detail": self.detail, "elapsed_ms": round(self.elapsed_ms, 1)}


@dataclass(frozen=True)
class Probe:
    peer: str
    kind: str
    essential: bool
    check: Callable[[], Awaitable[tuple[bool, str]]]


async def http_reachable(url: str, tls: ClientTls | None, timeout_s: float) -> tuple[bool, str]:
    """TCP connect plus, for https, a full TLS handshake: proves the route and the trust chain."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    ssl_ctx = client_context(tls) if secure else None
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl_ctx, server_hostname=host if secure else None),
            timeout_s)
    except TimeoutError:
        return False, f"no connection within {timeout_s:g} s"
    except OSError as exc:
        return False, f"{type(exc).__name__}: {exc.strerror or exc}"
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), timeout_s)
    except (OSError, TimeoutError):
        pass
    return True, "TLS handshake ok" if secure else "TCP connect ok"


def build_probes(config: DuoConfig, extra: list[Probe] | None = None) -> list[Probe]:
    timeout = config.daemon.readiness_timeout_s
    probes: list[Probe] = []
    mitz = config.mitz
    probes.append(Probe("mitz", "mitz", True,
                        lambda: http_reachable(str(mitz.closed_url), mitz.tls, timeout)))
    for h in config.tlb_hospitals:
        async def echo(h: Any = h) -> tuple[bool, str]:
            tls = client_context(h.tls) if h.tls else None
            result = await c_echo(config.listeners.dicom.ae_title, h.host, h.port, h.ae_title, timeout, tls)
            return result.ok, result.detail
        probes.append(Probe(f"tlb:{h.ura}", "dicom", False, echo))
    for c in config.xca_communities:
        async def reach(c: Any = c) -> tuple[bool, str]:
            return await http_reachable(str(c.iti38), c.tls, timeout)
        probes.append(Probe(f"xca:{c.home_community_id}", "xca", False, reach))
    probes.extend(extra or [])
    return probes


async def run_probes(probes: list[Probe], timeout_s: float) -> list[ProbeResult]:
    async def one(p: Probe) -> ProbeResult:
        started = time.perf_counter()
        try:
            ok, detail = await asyncio.wait_for(p.check(), timeout_s + 1)
        except TimeoutError:
            ok, detail = False, "probe timed out"
        except Exception as exc:  # a probe must report, never break /readyz
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        return ProbeResult(p.peer, p.kind, p.essential, ok, detail, (time.perf_counter() - started) * 1000)

    return list(await asyncio.gather(*(one(p) for p in probes)))
