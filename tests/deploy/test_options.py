"""The Serve application's arguments and `cosyserve serve --replicas` planning, without Ray; and
the core package staying free of Ray."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from cosyserve.deploy.local import local_options, share_resources
from cosyserve.deploy.options import DEPLOYMENT_NAME, DeploymentOptionsError, RayServeOptions
from cosyserve.settings import Settings


@pytest.fixture(autouse=True)
def _no_developer_env(monkeypatch) -> None:
    for name in (
        "COSYSERVE_MAX_ACTIVE",
        "COSYSERVE_MAX_QUEUE",
        "COSYSERVE_SHUTDOWN_TIMEOUT_S",
        "COSYSERVE_API_KEY",
    ):
        monkeypatch.delenv(name, raising=False)


def test_command_line_strings_become_options_and_engine_settings() -> None:
    options = RayServeOptions.from_args(
        {"model_dir": "/m", "num_replicas": "2", "num_gpus": "0.5", "max_active": "4", "batching": "false"}
    )
    assert options.num_replicas == 2 and options.num_gpus == 0.5
    assert options.settings == {"model_dir": "/m", "max_active": "4", "batching": "false"}
    engine = options.engine_settings()
    assert engine.model_dir == "/m" and engine.max_active == 4 and engine.batching is False

    deployment = options.deployment_options()
    assert deployment["name"] == DEPLOYMENT_NAME
    assert deployment["num_replicas"] == 2 and "autoscaling_config" not in deployment
    assert deployment["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert deployment["max_ongoing_requests"] == 4  # what one engine batches at once
    assert deployment["max_queued_requests"] == Settings().max_queue  # then Serve answers 503
    assert deployment["graceful_shutdown_timeout_s"] == Settings().shutdown_timeout_s + 5


def test_autoscaling_bounds() -> None:
    options = RayServeOptions.from_args({"min_replicas": 1, "max_replicas": 6, "max_active": 8})
    config = options.deployment_options()["autoscaling_config"]
    assert config == {
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": 6,
        "target_ongoing_requests": 4.0,
    }
    scaled_to_zero = RayServeOptions.from_args(
        {"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 3}
    )
    config = scaled_to_zero.deployment_options()["autoscaling_config"]
    assert (
        config["min_replicas"] == 0
        and config["initial_replicas"] == 1
        and config["target_ongoing_requests"] == 3
    )
    assert "num_replicas" not in scaled_to_zero.deployment_options()


def test_nested_settings_and_runtime_env() -> None:
    options = RayServeOptions.from_args(
        {"settings": {"max_active": 2}, "runtime_env": {"env_vars": {"A": "1"}}, "cpu_threads": 3}
    )
    assert options.engine_settings().max_active == 2 and options.replica_threads() == 3
    assert options.deployment_options()["ray_actor_options"]["runtime_env"] == {"env_vars": {"A": "1"}}
    assert RayServeOptions(num_cpus=2.5).replica_threads() == 2
    assert RayServeOptions(num_cpus=0.25).replica_threads() == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"modle_dir": "/m"}, "unknown argument.*modle_dir.*model_dir"),
        ({"port": "8000"}, "HTTP proxy"),
        ({"max_active": "0"}, "max_active"),
        ({"num_replicas": "two"}, "num_replicas"),
        ({"num_replicas": 2, "max_replicas": 4}, "not both"),
        ({"min_replicas": 5, "max_replicas": 2}, "above max_replicas"),
        ({"target_ongoing_requests": 2}, "needs max_replicas"),
        ({"num_gpus": "1.5"}, "whole"),
        ({"settings": "max_active=2"}, "mapping"),
        ({"instance_id": "same-for-all"}, "each replica names itself"),
    ],
)
def test_bad_arguments_are_clear_errors(args: dict, message: str) -> None:
    with pytest.raises(DeploymentOptionsError, match=f"(?s){message}") as caught:
        RayServeOptions.from_args(args)
    assert caught.value.status_code == 400


@pytest.mark.parametrize(
    ("replicas", "cpus", "gpus", "given", "expected"),
    [
        (2, 16, 0, (None, None), (8.0, 0.0)),
        (4, 16, 2, (None, None), (4.0, 0.5)),
        (4, 16, 3, (None, None), (4.0, 0.5)),  # 0.75 each would not pack: two per GPU instead
        (2, 16, 4, (None, None), (8.0, 1.0)),  # never more than one GPU per replica
        (3, 2, 0, (None, None), (0.666, 0.0)),  # rounded down, so three fit
        (2, 16, 1, (1.0, 0.25), (1.0, 0.25)),
    ],
)
def test_sharing_a_machine_between_replicas(replicas, cpus, gpus, given, expected) -> None:
    assert share_resources(replicas, cpus, gpus, *given) == expected


def test_sharing_refuses_what_the_machine_does_not_have() -> None:
    with pytest.raises(DeploymentOptionsError, match="more than the 4 CPUs"):
        share_resources(2, 4, 0, cpus_per_replica=3)
    with pytest.raises(DeploymentOptionsError, match="more than the 1 GPUs"):
        share_resources(2, 8, 1, gpus_per_replica=1)
    with pytest.raises(DeploymentOptionsError, match="at least 1"):
        share_resources(0, 8, 0)


def test_local_options_pass_the_given_settings_and_keep_the_key_out_of_the_arguments() -> None:
    settings = Settings(
        model_dir="/m", port=8100, host="0.0.0.0", max_active=3, api_key="s3cret", instance_id="one-name"
    )
    options = local_options(settings, 2, 1.0, 0.5)
    assert options.settings == {"model_dir": "/m", "max_active": 3}
    assert options.runtime_env == {"env_vars": {"COSYSERVE_API_KEY": "s3cret"}}
    assert "s3cret" not in repr(options.settings)
    assert options.num_replicas == 2 and options.num_gpus == 0.5


_NO_RAY = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoRay(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoRay())
    """
)


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _NO_RAY + textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_the_core_package_never_imports_ray() -> None:
    result = _python(
        """
        import cosyserve.server.app, cosyserve.cli, cosyserve.server.launch
        import cosyserve.deploy.options, cosyserve.deploy.local
        from cosyserve.cli import build_parser
        build_parser()
        assert not [m for m in sys.modules if m == "ray" or m.startswith("ray.")], "ray was imported"
        try:
            import cosyserve.deploy.ray_serve
        except ModuleNotFoundError as exc:
            assert exc.name == "ray", exc
        else:
            raise AssertionError("ray_serve imported without ray")
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_serve_replicas_without_ray_says_what_to_install() -> None:
    result = _python(
        """
        from cosyserve.cli import main
        sys.exit(main(["serve", "--replicas", "2"]))
        """
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "pip install 'cosyserve[ray]'" in result.stderr
