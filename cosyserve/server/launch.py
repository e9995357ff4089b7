"""``cosyserve serve``: load the model (auto-configured for this machine), print the URL, run
uvicorn. SIGTERM/SIGINT shut down gracefully: no new connections or synthesis, in-flight
requests get ``--shutdown_timeout_s`` to finish; then the server itself ends what still runs,
cleanly (a stream gets its final frame and a complete body), before uvicorn's own deadline
would cut connections mid-body."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from typing import TYPE_CHECKING, Any

from cosyserve.settings import Settings, add_arguments, settings_from_args

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger(__name__)

# uvicorn's graceful-shutdown deadline comes this long after ours: the app ends its streams
# itself (complete bodies); uvicorn's deadline would cancel them mid-body.
SHUTDOWN_MARGIN_S = 5.0


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)
    scale = parser.add_argument_group("scale-out on this machine (needs the cosyserve[ray] extra)")
    scale.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="run N replicas, each with its own model, behind Ray Serve's proxy on --host/--port",
    )
    scale.add_argument(
        "--cpus-per-replica", type=float, default=None, help="CPUs per replica (default: an equal share)"
    )
    scale.add_argument(
        "--gpus-per-replica",
        type=float,
        default=None,
        help="GPUs per replica, fractions allowed (default: the GPUs shared out equally, at most 1)",
    )
    parser.epilog = (
        "Every flag can also be set as an environment variable: COSYSERVE_<FLAG> "
        "(e.g. COSYSERVE_MODEL_DIR, COSYSERVE_API_KEY). A flag wins over the environment."
    )


def _log_level(args: argparse.Namespace) -> str:
    # The global --log-level defaults to INFO; let COSYSERVE_LOG_LEVEL decide when it is unset.
    flag = str(getattr(args, "log_level", "") or "").upper()
    env = os.environ.get("COSYSERVE_LOG_LEVEL", "").upper()
    return env if env and flag in ("", "INFO") else (flag or "INFO")


def public_urls(settings: Settings) -> list[str]:
    if settings.host in ("0.0.0.0", "::", ""):
        hosts = ["127.0.0.1", socket.gethostname()]
    else:
        hosts = [f"[{settings.host}]" if ":" in settings.host else settings.host]
    return [f"http://{host}:{settings.port}" for host in hosts]


def main(args: argparse.Namespace) -> int:
    from cosyserve.errors import CosyserveError
    from cosyserve.server.app import build_backend, create_app

    try:
        settings = settings_from_args(args, log_level=_log_level(args))
    except ValueError as exc:  # pydantic's ValidationError: a bad flag or env value
        print(f"cosyserve serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(settings.log_level)
    if getattr(args, "replicas", None) is not None:
        return _serve_replicas(settings, args)

    try:
        backend, report = build_backend(settings)
    except CosyserveError as exc:
        logger.error("cannot start: %s", exc.message)
        return 1
    for fallback in report.get("fallbacks", []) or []:
        logger.warning("fallback: %s", fallback)
    app = create_app(settings, backend=backend, launch_report=report)

    urls = public_urls(settings)
    print(f"cosyserve {backend.name} ready on {urls[0]}  (API docs: {urls[0]}/docs)", flush=True)
    if settings.api_key is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s without an API key: set COSYSERVE_API_KEY", settings.host)
    serve(app, settings)
    return 0


def serve(app: FastAPI, settings: Settings) -> None:
    """Run ``app`` under uvicorn until SIGTERM/SIGINT; the first signal starts the app's own
    graceful shutdown (see the module docstring)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.cosyserve.begin_shutdown()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=settings.shutdown_timeout_s + SHUTDOWN_MARGIN_S,
        # One process owns the model: several workers would each load it.
        workers=1,
    )
    Server(config).run()  # installs SIGTERM/SIGINT handlers; lifespan shutdown drains the engine
    return 0


def _serve_replicas(settings: Settings, args: argparse.Namespace) -> int:
    from cosyserve.errors import CosyserveError

    try:
        import ray.serve  # noqa: F401 - the optional extra
    except ImportError as exc:
        print(
            f"cosyserve serve --replicas needs Ray Serve: pip install 'cosyserve[ray]' ({exc})",
            file=sys.stderr,
        )
        return 1
    from cosyserve.deploy import local

    try:
        return local.run(settings, args.replicas, args.cpus_per_replica, args.gpus_per_replica)
    except CosyserveError as exc:
        print(f"cosyserve serve: {exc.message}", file=sys.stderr)
        return 2
