"""cosyserve as a Ray Serve application: many replicas, many machines, one endpoint.

Each replica is a whole cosyserve server (every route: the CosyVoice API, the OpenAI API, saved
voices, health, metrics) with its own model and engine; continuous batching stays inside each
replica, and Serve spreads requests over replicas and machines, restarts failed replicas and
autoscales on ongoing requests. Streaming responses stream through Serve's HTTP proxy.

    serve run cosyserve.deploy.ray_serve:app model_dir=/models/CosyVoice-300M-SFT num_replicas=2

or, in a ``serve deploy`` config: ``import_path: cosyserve.deploy.ray_serve:app`` with the same
keys under ``args:`` (see :mod:`cosyserve.deploy.options` for every key). Saved voices are shared
when every replica's ``voices_dir`` is one directory (a shared volume across machines).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from cosyserve.deploy.options import RayServeOptions

logger = logging.getLogger(__name__)


class CosyServeReplica:
    """One replica. Its ASGI app (the whole server) is built on the replica by
    :func:`create_replica_app`; Serve calls :meth:`check_health` every
    ``health_check_period_s`` and replaces the replica when it raises."""

    def check_health(self) -> None:
        app = getattr(self, "app", None)
        state = getattr(getattr(app, "state", None), "cosyserve", None)
        if state is not None and not state.engine.running:
            raise RuntimeError("the cosyserve engine thread has stopped")


def create_replica_app(options: RayServeOptions) -> FastAPI:
    """Load the model and build the server app inside a replica."""
    import ray

    from cosyserve.server.app import build_backend, create_app

    context = serve.get_replica_context()
    settings = options.engine_settings()
    logging.basicConfig(  # a no-op when Ray already gave the process a handler
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("cosyserve").setLevel(settings.log_level)
    # The replica id (the one Ray's dashboard and `serve status` show) names this instance.
    instance_id = settings.instance_id or f"{context.replica_tag}@{socket.gethostname()}"
    settings = options.engine_settings(instance_id=instance_id)
    backend, report = build_backend(settings)
    threads = _limit_torch_threads(options.replica_threads())
    report = dict(report)
    report["ray"] = {
        "app": context.app_name,
        "deployment": context.deployment,
        "replica": context.replica_tag,
        "node_id": ray.get_runtime_context().get_node_id(),
        "num_cpus": options.num_cpus,
        "num_gpus": options.num_gpus,
        "torch_threads": threads,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    app = create_app(settings, backend=backend, launch_report=report)
    if options.metrics_interval_s > 0:
        from cosyserve.deploy.ray_metrics import RayMetricsMirror

        mirror = RayMetricsMirror(
            app.state.cosyserve.metrics.registry, instance_id, options.metrics_interval_s
        )
        mirror.start()
        app.state.ray_metrics = mirror
    logger.info("replica %s ready: %s, plan %s", instance_id, backend.name, report.get("plan"))
    return app


def _limit_torch_threads(threads: int) -> int | None:
    """Replicas sharing a machine would each take every core (the CPU plans size torch's pool
    to the machine); keep each to its reserved CPUs."""
    try:
        import torch
    except ImportError:  # the embedded voice alone does not need torch
        return None
    if torch.get_num_threads() > threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def build_app(options: RayServeOptions) -> Application:
    """The bound Serve application for these options."""
    payload = options.model_dump()

    # A plain function: Serve pickles it with the deployment and calls it once per replica.
    def replica_app() -> FastAPI:
        return create_replica_app(RayServeOptions.model_validate(payload))

    ingress = serve.ingress(replica_app)(CosyServeReplica)
    deployment = serve.deployment(**options.deployment_options())(ingress)
    return deployment.bind()


def app(args: dict[str, Any]) -> Application:
    """Application builder for ``serve run cosyserve.deploy.ray_serve:app key=value ...`` and a
    ``serve deploy`` config's ``import_path`` (its ``args:`` arrive here)."""
    return build_app(RayServeOptions.from_args(args))
