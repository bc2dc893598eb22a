"""RFC 9457 problem details: the one error shape of DUO's JSON APIs."""

from __future__ import annotations

from typing import Any

from aiohttp import web

PROBLEM_CONTENT_TYPE = "application/problem+json"


def problem_response(status: int, title: str, detail: str, *, type_: str = "about:blank",
                     **extra: Any) -> web.Response:
    body: dict[str, Any] = {"type": type_, "title": title, "status": status, "detail": detail, **extra}
    return web.json_response(body, status=status, content_type=PROBLEM_CONTENT_TYPE)
