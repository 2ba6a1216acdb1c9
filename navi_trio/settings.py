"""Settings: every flag of ``navi-trio serve`` has a ``NAVI_*`` environment variable.

Read once at start (never per event: the hot path takes plain attributes).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from .origins import OriginPolicy


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@attrs.frozen
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("./navi-data")
    #: "scripted", or "openai"; default: "openai" when NAVI_OPENAI_BASE_URL is set.
    agent: str = ""
    auth: str = "optional"
    store: str = "sqlite"
    #: ``postgresql://user:password@host:port/dbname``: keep everything in PostgreSQL instead
    #: of SQLite. Never logged or shown (it may carry the password).
    database_url: str = attrs.field(default="", repr=False)
    #: ``redis://...``: this process is one of several serving as one server (a cluster).
    #: Never logged or shown (it may carry a password).
    redis_url: str = attrs.field(default="", repr=False)
    #: How long a run's owner may go silent before the others end its runs (a cluster).
    lease_s: float = 10.0
    heartbeat_s: float = 20.0
    grace_s: float = 10.0
    #: Bound on the shielded cleanup of a run (terminal event + saving its answer).
    save_timeout_s: float = 5.0
    #: How often the text of running answers is saved (a hard kill loses at most this).
    checkpoint_s: float = 0.5
    #: A client that accepts no data for this long is disconnected (TCP_USER_TIMEOUT).
    send_timeout_s: float = 30.0
    #: Frames a connection's outbox holds before its subscriptions switch to catch-up.
    outbox_size: int = 64
    #: Messages a session may hold with ``if_running: "enqueue"``.
    max_queued_runs: int = 4
    #: Limits (CONTRACT section 3 and 6).
    max_upload_mb: float = 25.0
    max_message_chars: int = 100_000
    max_connections_per_user: int = 32
    #: Bounds on a scripted agent's script, checked before it plays (CONTRACT section 4):
    #: anyone who can send a message can send a script.
    script_max_events: int = 100_000
    script_max_chars: int = 10_000_000
    script_max_seconds: float = 3600.0
    #: Events any run may hold, of any agent; past it the run ends with an ``error``.
    max_run_events: int = 200_000
    #: Browser origins served besides the server's own (CONTRACT section 1, "Browsers"):
    #: comma-separated ``scheme://host[:port]``, or ``*`` for any.
    allowed_origins: str = ""
    #: hypercorn's access log: "" (off), "-" (stderr) or a file; tokens are redacted.
    access_log: str = ""
    #: The OpenAI-compatible endpoint of ``--agent openai`` (CONTRACT section 5).
    openai_base_url: str = ""
    openai_api_key: str = attrs.field(default="", repr=False)
    openai_model: str = "gpt-4o-mini"
    openai_temperature: float | None = None
    openai_max_tokens: int | None = None
    openai_timeout_s: float = 60.0
    #: History budget (estimated tokens) before older turns are summarised.
    context_tokens: int = 16_000
    max_tool_rounds: int = 8
    #: With it set, ``GET /metrics`` needs ``Authorization: Bearer <this token>``.
    metrics_token: str = attrs.field(default="", repr=False)
    log_format: str = "auto"
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``NAVI_*`` variables, then apply non-None ``overrides``.

        Raises ``ValueError`` naming the variable for a value that does not parse.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field in attrs.fields(cls):
            name = f"NAVI_{field.name.upper()}"
            if name in env and env[name] != "":
                raw = env[name]
                try:
                    values[field.name] = _convert(field.type, raw)
                except ValueError:
                    raise ValueError(f"{name}={raw!r} is not a valid value") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "auth" not in values or values["auth"] is None:
            host = values.get("host", attrs.fields(cls).host.default)
            values["auth"] = "optional" if _is_loopback(str(host)) else "required"
        if not values.get("agent"):
            values["agent"] = "openai" if values.get("openai_base_url") else "scripted"
        if "data_dir" in values:
            values["data_dir"] = Path(values["data_dir"])
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.auth not in ("optional", "required"):
            raise ValueError(f"auth must be 'optional' or 'required', not {self.auth!r}")
        if self.store not in ("sqlite", "memory"):
            raise ValueError(f"store must be 'sqlite' or 'memory', not {self.store!r}")
        if self.database_url:
            if not self.database_url.startswith(("postgresql://", "postgres://")):
                raise ValueError("NAVI_DATABASE_URL must be a postgresql:// URL")
            if self.store == "memory":
                raise ValueError("NAVI_DATABASE_URL and --store memory contradict each other: choose one")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("NAVI_REDIS_URL must be a redis://, rediss:// or unix:// URL")
        if self.lease_s <= 0:
            raise ValueError("lease_s must be positive")
        if self.redis_url and not self.database_url:
            raise ValueError(
                "NAVI_REDIS_URL needs a PostgreSQL NAVI_DATABASE_URL: the processes of a cluster share one database"
            )
        if ":" in self.agent:  # a user's agent, module:factory: fail at startup if it cannot load
            from .agents import load_factory

            load_factory(self.agent)
        elif self.agent not in ("scripted", "openai"):
            raise ValueError(f"unknown agent {self.agent!r} (available: scripted, openai, or module:factory)")
        if self.agent == "openai" and not self.openai_base_url:
            raise ValueError("--agent openai needs NAVI_OPENAI_BASE_URL")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} out of range")
        for name in ("heartbeat_s", "grace_s", "save_timeout_s", "send_timeout_s", "checkpoint_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_upload_mb <= 0 or self.max_message_chars < 1 or self.max_connections_per_user < 1:
            raise ValueError("max_upload_mb, max_message_chars and max_connections_per_user must be positive")
        for name in ("script_max_events", "script_max_chars", "script_max_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_run_events < 4:
            raise ValueError("max_run_events must be at least 4 (a run's start, one event, what closes it, its end)")
        if self.outbox_size < 1 or self.max_queued_runs < 0:
            raise ValueError("outbox_size must be >= 1 and max_queued_runs >= 0")
        OriginPolicy.parse(self.allowed_origins)  # raises ValueError naming the bad entry


def _convert(type_: Any, raw: str) -> Any:
    t = type_ if isinstance(type_, str) else getattr(type_, "__name__", str(type_))
    if t in ("int", "int | None"):
        return int(raw)
    if t in ("float", "float | None"):
        return float(raw)
    if t == "Path":
        return Path(raw)
    return raw
