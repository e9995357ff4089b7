"""The arguments of the Ray Serve application, read and checked without importing Ray.

``serve run cosyserve.deploy.ray_serve:app model_dir=DIR num_replicas=2 max_active=4`` and a
``serve deploy`` config's ``args:`` arrive here as one flat mapping (strings from the command
line, typed values from YAML). Each key is either a scaling/placement option of this module or
one of the server's own settings (:class:`~cosyserve.settings.Settings`), which every replica's
engine receives unchanged; anything else is an error that lists what is accepted.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cosyserve.errors import InvalidRequestError
from cosyserve.settings import Settings

DEPLOYMENT_NAME = "CosyServe"
# The proxy owns the address; these settings mean nothing inside a replica.
_PROXY_SETTINGS = frozenset({"host", "port"})


class DeploymentOptionsError(InvalidRequestError):
    """Arguments of the Serve application that cannot work (unknown key, bad value, conflict)."""

    code = "invalid_deployment_options"


class RayServeOptions(BaseModel):
    """Scaling and placement of the cosyserve deployment, plus the engine settings of its
    replicas (``settings``: only the keys that were given; the rest come from each replica's
    ``COSYSERVE_*`` environment, then the defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_replicas: int | None = Field(None, ge=1, description="fixed number of replicas (default 1)")
    min_replicas: int | None = Field(None, ge=0, description="autoscaling: fewest replicas")
    max_replicas: int | None = Field(None, ge=1, description="autoscaling: most replicas")
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="autoscaling: requests per replica to aim for (default max_active / 2)"
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica (fractions allowed)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (0.5: two replicas share a GPU)")
    cpu_threads: int | None = Field(
        None, ge=1, description="torch threads per replica (default: its whole CPUs, at least 1)"
    )
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="requests Serve sends one replica at once (default max_active)"
    )
    max_queued_requests: int | None = Field(
        None, ge=1, description="requests waiting in each Serve proxy before a 503 (default max_queue)"
    )
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    metrics_interval_s: float = Field(
        5.0, ge=0, description="how often each replica copies its metrics to Ray's exporter (0: never)"
    )
    runtime_env: dict[str, Any] | None = Field(None, description="Ray runtime_env of the replicas")
    settings: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_scaling(self) -> RayServeOptions:
        autoscaling = self.min_replicas is not None or self.max_replicas is not None
        if autoscaling and self.num_replicas is not None:
            raise ValueError("give num_replicas (fixed) or min_replicas/max_replicas (autoscaling), not both")
        if self.target_ongoing_requests is not None and not autoscaling:
            raise ValueError("target_ongoing_requests needs max_replicas (autoscaling)")
        if autoscaling and (self.min_replicas or 0) > (self.max_replicas or math.inf):
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})"
            )
        if self.num_gpus > 1 and not self.num_gpus.is_integer():
            raise ValueError(f"num_gpus above 1 must be whole, got {self.num_gpus}")
        return self

    # ------------------------------------------------------------------ reading the arguments

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> RayServeOptions:
        """Split a flat argument mapping into options and engine settings, check both."""
        args = dict(args or {})
        nested = args.pop("settings", None) or {}
        if not isinstance(nested, dict):
            raise DeploymentOptionsError("settings must be a mapping of server settings")
        own = set(cls.model_fields) - {"settings"}
        options = {k: v for k, v in args.items() if k in own}
        settings = {**nested, **{k: v for k, v in args.items() if k not in own}}
        unknown = sorted(set(settings) - set(Settings.model_fields))
        if unknown:
            raise DeploymentOptionsError(
                f"unknown argument(s) {', '.join(unknown)}; accepted: scaling {', '.join(sorted(own))}, "
                f"and the server settings {', '.join(sorted(set(Settings.model_fields) - _PROXY_SETTINGS))}"
            )
        if "instance_id" in settings:
            raise DeploymentOptionsError(
                "instance_id cannot be given to a deployment: each replica names itself (<replica>@<host>)"
            )
        misplaced = sorted(set(settings) & _PROXY_SETTINGS)
        if misplaced:
            raise DeploymentOptionsError(
                f"{', '.join(misplaced)} belong to Ray Serve's HTTP proxy, not to the replicas: set "
                "http_options in the Serve config (or `serve start --http-host/--http-port`)"
            )
        try:
            made = cls(**options, settings=settings)
            made.engine_settings()  # bad setting values fail here, before anything is deployed
        except ValidationError as exc:
            raise DeploymentOptionsError(f"invalid Serve application arguments:\n{exc}") from exc
        return made

    def engine_settings(self, **overrides: Any) -> Settings:
        """The replica's settings: the given ones over its environment and the defaults."""
        return Settings(**{**self.settings, **overrides})

    # ------------------------------------------------------------------ what Serve receives

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None or self.min_replicas is not None

    def replica_threads(self) -> int:
        return self.cpu_threads or max(1, math.floor(self.num_cpus))

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of ``serve.deployment`` (plain values: testable without Ray)."""
        engine = self.engine_settings()
        max_active = engine.max_active
        actor: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.runtime_env:
            actor["runtime_env"] = dict(self.runtime_env)
        options: dict[str, Any] = {
            "name": DEPLOYMENT_NAME,
            "ray_actor_options": actor,
            # A replica is sent only what its engine batches at once; the rest waits in Serve's
            # router, which hands it to whichever replica frees a slot first.
            "max_ongoing_requests": self.max_ongoing_requests or max_active,
            # Back-pressure moves with the queue: it is Serve's router that holds waiting requests.
            "max_queued_requests": self.max_queued_requests or max(1, engine.max_queue),
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            # In-flight streams get the engine's drain time, plus a margin for the lifespan.
            "graceful_shutdown_timeout_s": engine.shutdown_timeout_s + 5.0,
        }
        if self.autoscaling:
            low = self.min_replicas if self.min_replicas is not None else 1
            options["autoscaling_config"] = {
                "min_replicas": low,
                "initial_replicas": max(low, 1),
                "max_replicas": self.max_replicas if self.max_replicas is not None else max(low, 1),
                "target_ongoing_requests": self.target_ongoing_requests or max(1.0, max_active / 2),
            }
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options
