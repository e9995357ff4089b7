"""``cosyserve serve --replicas N``: the Ray Serve application on this machine, for a machine
with several GPUs (or many cores) that one engine cannot fill.

Starts a local Ray instance (or joins the one ``RAY_ADDRESS`` names), shares the machine's CPUs
and GPUs out between the replicas, serves on ``--host``/``--port`` through Serve's proxy and
runs until SIGINT/SIGTERM, then drains and stops everything it started.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from typing import Any

from cosyserve.deploy.options import DeploymentOptionsError, RayServeOptions
from cosyserve.settings import Settings

logger = logging.getLogger(__name__)

APP_NAME = "cosyserve"
# Settings the proxy (not a replica) owns, the secret (sent as an environment variable), and
# the instance name (each replica names itself).
_NOT_PASSED = {"host", "port", "api_key", "instance_id"}


def share_resources(
    replicas: int,
    cpus: float,
    gpus: float,
    cpus_per_replica: float | None = None,
    gpus_per_replica: float | None = None,
) -> tuple[float, float]:
    """CPUs and GPUs per replica on a machine with ``cpus``/``gpus``: an equal share unless
    given; one replica never gets more than one GPU (a model runs on one device)."""
    if replicas < 1:
        raise DeploymentOptionsError(f"--replicas must be at least 1, got {replicas}")
    cpu_share = cpus_per_replica if cpus_per_replica is not None else cpus / replicas
    if gpus_per_replica is not None:
        gpu_share = gpus_per_replica
    elif gpus >= 1:
        # Equal fractions that fill whole GPUs (3 GPUs, 4 replicas: 2 per GPU at 0.5, not 0.75
        # each, which no GPU could hold twice).
        gpu_share = 1.0 / math.ceil(replicas / int(gpus))
    else:
        gpu_share = 0.0
    if cpu_share * replicas > cpus + 1e-9:
        raise DeploymentOptionsError(
            f"{replicas} replicas x {cpu_share:g} CPUs is more than the {cpus:g} CPUs here"
        )
    if gpu_share * replicas > gpus + 1e-9:
        raise DeploymentOptionsError(
            f"{replicas} replicas x {gpu_share:g} GPUs is more than the {gpus:g} GPUs here"
        )
    # Rounded down: three replicas of 0.667 CPUs would not fit on 2.
    return _floor3(cpu_share), _floor3(gpu_share)


def _floor3(value: float) -> float:
    return math.floor(value * 1000 + 1e-9) / 1000


def local_options(settings: Settings, replicas: int, cpu_share: float, gpu_share: float) -> RayServeOptions:
    """The Serve application's options for the settings this command was given."""
    given = {k: v for k, v in settings.model_dump().items() if k in settings.model_fields_set}
    engine = {k: v for k, v in given.items() if k not in _NOT_PASSED and v is not None}
    runtime_env = None
    if settings.api_key is not None:
        runtime_env = {"env_vars": {"COSYSERVE_API_KEY": settings.api_key.get_secret_value()}}
    return RayServeOptions(
        num_replicas=replicas,
        num_cpus=cpu_share,
        num_gpus=gpu_share,
        runtime_env=runtime_env,
        settings=engine,
    )


def run(
    settings: Settings,
    replicas: int,
    cpus_per_replica: float | None = None,
    gpus_per_replica: float | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Serve until ``stop`` is set (by default: until SIGINT/SIGTERM)."""
    import ray
    from ray import serve

    from cosyserve.deploy.ray_serve import build_app
    from cosyserve.server.launch import public_urls

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(logging_level=logging.WARNING)
    # After ray.init, which installs handlers of its own that would abort the process.
    stop = stop or _stop_on_signals()
    try:
        resources: dict[str, Any] = ray.cluster_resources()
        cpu_share, gpu_share = share_resources(
            replicas,
            float(resources.get("CPU", 1)),
            float(resources.get("GPU", 0)),
            cpus_per_replica,
            gpus_per_replica,
        )
        options = local_options(settings, replicas, cpu_share, gpu_share)
        serve.start(http_options={"host": settings.host, "port": settings.port})
        logger.info(
            "deploying %d replicas (%g CPUs, %g GPUs each); each loads its own model",
            replicas,
            cpu_share,
            gpu_share,
        )
        serve.run(build_app(options), name=APP_NAME, route_prefix="/", blocking=False)
        url = public_urls(settings)[0]
        print(
            f"cosyserve: {replicas} replicas ready behind {url}  (API docs: {url}/docs)",
            flush=True,
        )
        stop.wait()
        logger.info("stopping: draining the replicas")
        serve.delete(APP_NAME)
        serve.shutdown()
        return 0
    finally:
        if started_ray:
            ray.shutdown()


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handle(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stop
