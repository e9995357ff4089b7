"""The KubeRay examples in deploy/kuberay: every pod template and volume claim validated against
the Kubernetes schemas (kubernetes-validate), the RayService fields against a schema of the
RayService fields they use (typos and wrong types fail), the serve config against Ray Serve's
own schema and cosyserve's argument checks, and the sizes the README promises (replicas fit the
pods, the voices volume is shared, metrics are exposed)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cosyserve.deploy.options import RayServeOptions

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="the dev extra is not installed")

KUBERAY = Path(__file__).resolve().parents[2] / "deploy" / "kuberay"
MANIFESTS = ["rayservice-cpu.yaml", "rayservice-gpu.yaml"]
K8S_VERSION = "1.33"

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_GROUP_COMMON = {
    "rayStartParams": _STRING_MAP,  # KubeRay takes map[string]string: numbers must be quoted
    "template": {"type": "object", "required": ["spec"]},
    "serviceType": {"type": "string"},
}
# The part of KubeRay's ray.io/v1 RayService schema these examples use, closed to unknown keys.
RAYSERVICE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayService"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}},
        },
        "spec": {
            "type": "object",
            "required": ["serveConfigV2", "rayClusterConfig"],
            "additionalProperties": False,
            "properties": {
                "serveConfigV2": {"type": "string"},
                "upgradeStrategy": {"type": "object"},
                "serveService": {"type": "object"},
                "rayClusterConfig": {
                    "type": "object",
                    "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
                    "additionalProperties": False,
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "autoscalerOptions": {"type": "object"},
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["rayStartParams", "template"],
                            "additionalProperties": False,
                            "properties": _GROUP_COMMON,
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["groupName", "rayStartParams", "template"],
                                "additionalProperties": False,
                                "properties": {
                                    **_GROUP_COMMON,
                                    "groupName": {"type": "string"},
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 1},
                                    "numOfHosts": {"type": "integer", "minimum": 1},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((KUBERAY / name).read_text(encoding="utf-8")) if doc]


def pod_templates(service: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    cluster = service["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [(name, group, group["template"]) for name, group in groups]


def quantity(value: Any) -> float:
    """A Kubernetes CPU/GPU quantity as a number ("500m" -> 0.5)."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@pytest.mark.parametrize("name", MANIFESTS)
def test_rayservice_validates(name: str) -> None:
    (service,) = load(name)
    jsonschema.validate(service, RAYSERVICE_SCHEMA)
    for group, _, template in pod_templates(service):
        wrapped = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": group},
            "template": template,
        }
        kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)


def test_a_typo_is_caught() -> None:
    (service,) = load("rayservice-cpu.yaml")
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 4
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        jsonschema.validate(service, RAYSERVICE_SCHEMA)
    (service,) = load("rayservice-cpu.yaml")
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(service, RAYSERVICE_SCHEMA)
    _, _, template = pod_templates(service)[1]
    template["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template},
            K8S_VERSION,
            strict=True,
        )


def test_volume_claims_validate_and_the_voice_store_is_shared() -> None:
    claims = {doc["metadata"]["name"]: doc for doc in load("storage.yaml")}
    for claim in claims.values():
        kubernetes_validate.validate(claim, K8S_VERSION, strict=True)
    assert claims["cosyserve-voices"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claims["cosyserve-models"]["spec"]["accessModes"] == ["ReadOnlyMany"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_serve_config_is_a_valid_cosyserve_application(name: str) -> None:
    (service,) = load(name)
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    schema = pytest.importorskip("ray.serve.schema", reason="the ray extra is not installed")
    schema.ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "cosyserve.deploy.ray_serve:app" and app["route_prefix"] == "/"
    options = RayServeOptions.from_args(app["args"])
    assert options.deployment_options()["autoscaling_config"]["max_replicas"] >= 2

    cluster = service["spec"]["rayClusterConfig"]
    # The head runs no replica; workers hold them all.
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (workers,) = cluster["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    cpus, gpus = quantity(limits["cpu"]), quantity(limits.get("nvidia.com/gpu", 0))
    per_pod = math.floor(cpus / options.num_cpus)
    if options.num_gpus:
        per_pod = min(per_pod, math.floor(gpus / options.num_gpus))
    assert per_pod >= 1, "a replica does not fit in a worker pod"
    assert per_pod * workers["maxReplicas"] >= options.max_replicas, "max_replicas cannot all be placed"
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]

    # Mounted where the arguments point: models read-only, voices on the shared claim.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in workers["template"]["spec"]["volumes"]}
    model_dir, voices_dir = Path(options.settings["model_dir"]), options.settings["voices_dir"]
    models = next(m for path, m in mounts.items() if Path(path) in model_dir.parents)
    assert models["readOnly"] is True
    assert volumes[mounts[voices_dir]["name"]]["persistentVolumeClaim"]["claimName"] == "cosyserve-voices"


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_node_exports_metrics_and_runs_the_same_image(name: str) -> None:
    (service,) = load(name)
    images = set()
    for group, spec, template in pod_templates(service):
        assert spec["rayStartParams"]["metrics-export-port"] == "8080", group
        (container,) = template["spec"]["containers"]
        images.add(container["image"])
        assert {"name": "metrics", "containerPort": 8080} in container["ports"], group
    assert len(images) == 1, f"head and workers must run one Ray version: {images}"


def test_ray_version_is_one_the_extra_accepts() -> None:
    from packaging.requirements import Requirement

    pyproject = (KUBERAY.parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    spec = Requirement(re.search(r'ray = \["(ray\[serve\][^"]+)"\]', pyproject).group(1)).specifier
    dockerfile = (KUBERAY / "Dockerfile").read_text(encoding="utf-8")
    for name in MANIFESTS:
        (service,) = load(name)
        version = service["spec"]["rayClusterConfig"]["rayVersion"]
        assert version in spec, (version, str(spec))
        assert f"rayproject/ray:{version}-" in dockerfile
