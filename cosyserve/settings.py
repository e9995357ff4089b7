"""Server settings: one pydantic-settings class that reads command-line flags and
``COSYSERVE_*`` environment variables alike (a flag wins over the environment).

The seed server's flag names are kept (``--model_dir``, ``--port``, ``--load_jit``,
``--load_trt``, ``--fp16``, ``--trt_concurrent``); every flag is also accepted with dashes.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The server's first streaming hop: the first chunk waits for 25 + 20 (overlap) speech tokens
# instead of upstream's 100 + 20, so a stream starts ~2.5x sooner (CosyVoice2 streams with 25-token
# hops). The library (`Synthesizer`) keeps upstream's hop, whose chunking the parity tests pin.
LOW_LATENCY_FIRST_HOP = 25

# Browsers on the same machine may call the API by default; anything else must be listed.
LOCALHOST_ORIGIN_REGEX = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="COSYSERVE_", extra="ignore", validate_default=True, protected_namespaces=()
    )

    # --- model and acceleration (read by cosyserve.acceleration.launcher) ---
    model_dir: str | None = Field(
        None, description="CosyVoice model directory or hub id; unset = the embedded default voice"
    )
    load_jit: bool = Field(False, description="load the TorchScript (JIT) LLM/flow encoders")
    load_trt: bool = Field(False, description="use a TensorRT engine for the flow decoder estimator")
    fp16: bool = Field(False, description="half precision for the accelerated paths")
    trt_concurrent: int = Field(1, ge=1, le=64, description="TensorRT execution contexts")
    auto: bool = Field(True, description="pick the fastest working configuration for this machine")
    force_config: str | None = Field(None, description="skip auto-configuration and use this plan")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    voices_dir: str | None = Field(None, description="where saved voices live (default: <model_dir>/voices)")
    stream_first_hop: int | None = Field(
        LOW_LATENCY_FIRST_HOP,
        ge=1,
        description="speech tokens in a stream's first hop (smaller: earlier first audio; 100 = upstream)",
    )

    # --- HTTP ---
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 for all interfaces)")
    port: int = Field(9234, ge=0, le=65535, description="port to listen on")
    api_key: SecretStr | None = Field(
        None,
        description="require 'Authorization: Bearer <key>' (prefer the env var COSYSERVE_API_KEY: flags show in ps)",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="extra origins whose pages may call the API (CORS; without an API key, the only "
        "browser origins accepted besides the server's own and localhost), comma-separated ('*' = any)",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names accepted besides the loopback ones while listening on loopback without "
        "an API key (a DNS-rebinding defence), comma-separated ('*' = any)",
    )

    # --- limits and back-pressure ---
    max_queue: int = Field(64, ge=0, description="requests that may wait for a busy slot before 429")
    max_active: int = Field(8, ge=1, description="requests the engine steps concurrently")
    batching: bool = Field(True, description="continuous batching across concurrent CosyVoice requests")
    max_batch: int | None = Field(
        None, ge=1, description="rows in one batched LLM decode step (default max_active)"
    )
    token_budget: int | None = Field(None, ge=1, description="speech tokens of flow work per engine step")
    flow_batch: int | None = Field(
        None, ge=1, description="requests sharing one flow call (default: 1 on CPU)"
    )
    max_text_chars: int = Field(5000, ge=1, le=50_000, description="longest accepted text")
    max_upload_mb: float = Field(20.0, gt=0, description="largest accepted prompt upload (MiB)")
    decode_workers: int = Field(
        2, ge=0, le=64, description="processes that decode uploaded audio (0: in the server process)"
    )
    decode_timeout_s: float = Field(
        20.0,
        gt=0,
        description="an upload still decoding after this long is refused (its decoder is restarted)",
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="a request (queue + synthesis) running longer is cancelled"
    )
    shutdown_timeout_s: float = Field(
        15.0, ge=0, description="on SIGTERM, in-flight requests get this long to finish"
    )
    health_cache_s: float = Field(10.0, ge=0, description="how long a /health result is reused")
    instance_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.:@/#\-]{1,128}$",
        description="name of this server process in the X-Cosyserve-Instance header and "
        "/performance_info (default <pid>@<hostname>)",
    )

    # --- realtime (WebSocket text-in sessions, Wyoming) ---
    realtime_idle_timeout_s: float = Field(
        60.0, gt=0, description="a realtime connection with no message and nothing to send is closed (4408)"
    )
    realtime_buffer_s: float = Field(
        30.0, gt=0, description="audio made ahead of a realtime client's reading; synthesis pauses beyond"
    )
    realtime_send_timeout_s: float = Field(
        30.0, gt=0, description="a realtime client that reads nothing for this long is closed (4429)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @field_validator("cors_origins", "allowed_hosts", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("model_dir", "force_config", "api_key", "voices_dir", "instance_id", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        # `COSYSERVE_API_KEY=` (empty) must mean "no key", not "the empty key".
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def public_dict(self) -> dict[str, Any]:
        """The settings without secrets, for /performance_info and logs."""
        data = self.model_dump()
        data["api_key"] = "set" if self.api_key else None
        return data


# Flags that the top-level `cosyserve` parser already owns.
_SKIP_FLAGS = {"log_level"}


def add_arguments(parser: argparse.ArgumentParser, only: Iterable[str] | None = None) -> None:
    """Add one flag per setting (or per setting named in ``only``). Defaults are None so unset
    flags fall through to env/defaults."""
    wanted = None if only is None else set(only)
    for name, field in Settings.model_fields.items():
        if name in _SKIP_FLAGS or (wanted is not None and name not in wanted):
            continue
        flags = [f"--{name}"]
        if "_" in name:
            flags.append(f"--{name.replace('_', '-')}")
        help_text = field.description or ""
        if field.annotation is bool:
            default = field.default
            parser.add_argument(
                *flags,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{help_text} (default {'on' if default else 'off'})",
            )
        else:
            default = field.default if field.default_factory is None else None
            shown = f" (default {default})" if default not in (None, "") and name != "api_key" else ""
            parser.add_argument(*flags, dest=name, default=None, metavar=name.upper(), help=help_text + shown)


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Settings from flags given on the command line, then environment, then defaults."""
    given = {
        name: getattr(args, name)
        for name in Settings.model_fields
        if name not in _SKIP_FLAGS and getattr(args, name, None) is not None
    }
    given.update(overrides)
    return Settings(**given)
