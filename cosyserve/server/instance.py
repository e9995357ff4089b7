"""Which server process answered: a stable id per process, sent as ``X-Cosyserve-Instance`` on
every response and shown in ``/performance_info``, so an operator behind a load balancer (or Ray
Serve's proxy) can tell replicas apart."""

from __future__ import annotations

import os
import socket

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

INSTANCE_HEADER = "X-Cosyserve-Instance"


def default_instance_id() -> str:
    """``<pid>@<hostname>``: unique among live processes, and on Kubernetes the hostname is the
    pod's name."""
    return f"{os.getpid()}@{socket.gethostname()}"


class InstanceHeaderMiddleware:
    """Adds the instance header to every HTTP response, errors and CORS preflights included
    (so it is mounted outermost)."""

    def __init__(self, app: ASGIApp, *, instance_id: str):
        self.app = app
        self.instance_id = instance_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_instance(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[INSTANCE_HEADER] = self.instance_id
            await send(message)

        await self.app(scope, receive, send_with_instance)
