"""Browser-borne attacks on a server without an API key: cross-site requests and DNS rebinding.

A page on any web site can make its visitor's browser POST a form or a multipart body to
``http://127.0.0.1:9234`` without a CORS preflight: the browser sends it, only the *response*
is hidden from the page. Without an API key that would create voices and spend the machine on
synthesis. And a site whose DNS name is re-pointed at 127.0.0.1 ("DNS rebinding") is, to the
browser, the same origin as the server, so it can read the responses too. Jupyter and the
Docker daemon defend the same way as :class:`BrowserGuard` does:

* **Host**: when the server listens on a loopback address, only loopback names are accepted in
  the ``Host`` header (``localhost``, ``*.localhost``, ``127.x.x.x``, ``[::1]``) plus the
  configured ``allowed_hosts``; a rebound name such as ``attacker.example`` gets a 403.
* **Origin**: a request that changes state or synthesises (any method but GET/HEAD/OPTIONS, and
  upstream's GET ``/inference_*``) from a browser page is accepted only from the server's own
  origin (the playground), from ``localhost`` pages (the CORS default) or from the configured
  ``cors_origins``. Browsers send ``Origin`` on every such cross-origin request; a request
  without it (curl, the OpenAI client, scripts) is not a browser's and passes, unless the
  browser's ``Sec-Fetch-Site: cross-site`` says it came from another site.

With an API key neither check is needed (a cross-site page cannot add the key), so the app only
installs this middleware while ``COSYSERVE_API_KEY`` is unset.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from cosyserve.server.schemas import error_body

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# GET routes that synthesise (upstream accepts GET with query fields): guarded like a POST.
SYNTHESIS_GET_PATHS = frozenset({"/inference_sft", "/inference_instruct"})


def split_host(value: str) -> str:
    """The host name of a ``Host`` header or URL authority, lower-case, without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value[1:]
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


def is_loopback_name(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BrowserGuard:
    """Pure ASGI middleware; see the module docstring. ``allowed_origins``: exact origins
    (``https://app.example``) or ``*``; ``allowed_hosts``: host names (or ``*``) accepted besides
    the loopback names when the server listens on loopback."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        allowed_origins: Iterable[str] = (),
        allowed_hosts: Iterable[str] = (),
        localhost_origin_regex: str | None = None,
    ):
        self.app = app
        self.origins = {o.strip().rstrip("/").lower() for o in allowed_origins if o.strip()}
        self.hosts = {split_host(h) for h in allowed_hosts if h.strip()}
        self.localhost_origin = re.compile(localhost_origin_regex) if localhost_origin_regex else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host_header = headers.get("host", "")
        refusal = self._check_host(scope, host_header) or self._check_origin(scope, headers, host_header)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        code, message = refusal
        from fastapi.responses import JSONResponse

        path = scope.get("path", "")
        body = error_body(403, code, message, openai_style=path.startswith("/v1/"))
        await JSONResponse(body, status_code=403)(scope, receive, send)

    def _check_host(self, scope: Scope, host_header: str) -> tuple[str, str] | None:
        if "*" in self.hosts or not host_header:
            return None
        server = scope.get("server")
        bound = str(server[0]) if server else ""
        try:
            on_loopback = ipaddress.ip_address(bound).is_loopback
        except ValueError:
            on_loopback = False
        if not on_loopback and not self.hosts:
            return None  # listening on a public address: every name that reaches us is fine
        host = split_host(host_header)
        if host in self.hosts or (on_loopback and is_loopback_name(host)):
            return None
        return (
            "forbidden_host",
            f"Host {host_header!r} is not accepted: this server listens on loopback and answers only "
            "to localhost names (a DNS-rebinding defence); add the name to COSYSERVE_ALLOWED_HOSTS "
            "if it is yours",
        )

    def _check_origin(self, scope: Scope, headers: Headers, host_header: str) -> tuple[str, str] | None:
        method = scope.get("method", "GET")
        if method in SAFE_METHODS and scope.get("path") not in SYNTHESIS_GET_PATHS:
            return None
        origin = headers.get("origin")
        if origin is None:
            if headers.get("sec-fetch-site", "").lower() != "cross-site":
                return None  # not sent by a browser page of another site
            origin = "another site"
        elif self._origin_allowed(origin, host_header):
            return None
        return (
            "forbidden_origin",
            f"a browser request from {origin} is refused: without an API key this server accepts "
            "browser requests only from its own pages and from localhost; list the origin in "
            "COSYSERVE_CORS_ORIGINS, or set COSYSERVE_API_KEY",
        )

    def _origin_allowed(self, origin: str, host_header: str) -> bool:
        normalized = origin.strip().rstrip("/").lower()
        if "*" in self.origins or normalized in self.origins:
            return True
        if self.localhost_origin is not None and self.localhost_origin.fullmatch(normalized):
            return True
        # Same origin: the page was served by this server (the playground).
        _, _, authority = normalized.partition("://")
        return bool(authority) and authority == host_header.strip().lower()
