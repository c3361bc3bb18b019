"""Console settings: one frozen object built once at start from defaults, environment and CLI flags.

Nothing here runs at import time: `Settings.from_env()` reads the environment when the CLI calls it.

Environment variables (all optional; CLI flags win):

    SPECDESK_MODEL, SPECDESK_SPECULATOR, SPECDESK_DB, SPECDESK_DATA_DIR, SPECDESK_HOST, SPECDESK_PORT,
    SPECDESK_API_KEYS (comma separated), SPECDESK_AGENTS ("alice:pw,bob:sha256:<hex>"),
    SPECDESK_AGENTS_FILE (one "name:password" or "name:sha256:<hex>" per line), SPECDESK_MAX_TOKENS,
    SPECDESK_TEMPERATURE, SPECDESK_TOP_P, SPECDESK_COMPANY, SPECDESK_AGENT_NAME, SPECDESK_DEVICE,
    SPECDESK_DTYPE
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
_SHA256_PREFIX = "sha256:"


@dataclass(frozen=True)
class Settings:
    """Everything the console needs to start. `model=None` means the engine's built-in default model,
    `speculator=None` the engine's default speculator ("none" turns speculation off).

    `agents` maps a login name to a password, either plain or as "sha256:<hex digest>"; empty means no
    login screen (fine on a laptop, not on a shared host).
    """

    model: str | None = None
    speculator: str | None = None
    db_url: str | None = None
    data_dir: Path = field(default_factory=lambda: Path.home() / ".local" / "share" / "specdesk")
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_keys: tuple[str, ...] = ()
    agents: Mapping[str, str] = field(default_factory=dict)
    company: str = "Northwind"  # fills {company} in the system prompts and macros
    agent_name: str = "Alex"  # the name the drafted replies sign with
    max_tokens: int = 384
    # Sampled drafts by default: greedy decoding of a small model loops on one sentence. Speculation
    # keeps the sampled distribution unchanged (rejection sampling), so it stays on.
    temperature: float = 0.7
    top_p: float = 0.9
    device: str = "auto"
    dtype: str = "auto"
    quantization: str | None = None  # "int4": the layers' weights in 4 bits on CPU (EngineConfig.quantization)
    enforce_eager: bool = False  # no CUDA graphs (EngineConfig.enforce_eager)
    engine_kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra EngineConfig fields (tests)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name, secret in self.agents.items():
            if not name or ":" in name or not secret:
                raise ValueError(f"agent entries need a name without ':' and a password, got {name!r}")

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL: the configured one, or a SQLite file in the data directory."""
        return self.db_url or f"sqlite:///{self.data_dir / 'specdesk.db'}"

    @property
    def auth_required(self) -> bool:
        return bool(self.agents)

    def check_login(self, username: str, password: str) -> bool:
        """Gradio's auth callback: constant-time comparison against a plain or sha256 password."""
        expected = self.agents.get(username)
        if expected is None:
            return False
        if expected.startswith(_SHA256_PREFIX):
            digest = hashlib.sha256(password.encode("utf-8")).hexdigest()
            return hmac.compare_digest(digest, expected[len(_SHA256_PREFIX) :].lower())
        return hmac.compare_digest(password.encode("utf-8"), expected.encode("utf-8"))

    def engine_config(self) -> dict[str, Any]:
        """Keyword arguments for `engine.LLM` (besides the model).

        `speculator=None` keeps the engine's own default; "none" or "off" turns speculation off.
        """
        kwargs: dict[str, Any] = {"device": self.device, "dtype": self.dtype}
        if self.quantization is not None and self.quantization.strip().lower() not in ("", "none", "off"):
            kwargs["quantization"] = self.quantization
        if self.enforce_eager:
            kwargs["enforce_eager"] = True
        if self.speculator is not None:
            off = self.speculator.strip().lower() in ("none", "off")
            kwargs["speculator"] = None if off else self.speculator
        kwargs.update(self.engine_kwargs)
        return kwargs

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with the non-None overrides applied (CLI flags over environment)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Defaults overlaid with SPECDESK_* variables. Reads `os.environ` only when called."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for key, name, convert in _ENV_FIELDS:
            raw = env.get(key, "").strip()
            if raw:
                try:
                    values[name] = convert(raw)
                except ValueError as exc:
                    raise ValueError(f"{key}={raw!r}: {exc}") from None
        agents = dict(parse_agents(env.get("SPECDESK_AGENTS", "").replace(",", "\n")))
        agents_file = env.get("SPECDESK_AGENTS_FILE", "").strip()
        if agents_file:
            agents.update(load_agents_file(Path(agents_file)))
        if agents:
            values["agents"] = agents
        return cls(**values)


def parse_agents(text: str) -> dict[str, str]:
    """Parse "name:password" lines; blank lines and lines starting with '#' are skipped."""
    agents: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, secret = line.partition(":")
        if not sep or not name.strip() or not secret:
            raise ValueError(f"agents line {number}: expected 'name:password', got {line!r}")
        agents[name.strip()] = secret
    return agents


def load_agents_file(path: Path) -> dict[str, str]:
    """Agents from a settings file: one "name:password" or "name:sha256:<hex>" per line."""
    try:
        return parse_agents(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read agents file {path}: {exc.strerror}") from None


def _api_keys(raw: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in raw.split(",") if k.strip())


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be a positive integer")
    return value


_ENV_FIELDS: tuple[tuple[str, str, Any], ...] = (
    ("SPECDESK_MODEL", "model", str),
    ("SPECDESK_SPECULATOR", "speculator", str),
    ("SPECDESK_DB", "db_url", str),
    ("SPECDESK_DATA_DIR", "data_dir", lambda raw: Path(raw).expanduser()),
    ("SPECDESK_HOST", "host", str),
    ("SPECDESK_PORT", "port", _positive_int),
    ("SPECDESK_API_KEYS", "api_keys", _api_keys),
    ("SPECDESK_MAX_TOKENS", "max_tokens", _positive_int),
    ("SPECDESK_TEMPERATURE", "temperature", float),
    ("SPECDESK_TOP_P", "top_p", float),
    ("SPECDESK_COMPANY", "company", str),
    ("SPECDESK_AGENT_NAME", "agent_name", str),
    ("SPECDESK_DEVICE", "device", str),
    ("SPECDESK_DTYPE", "dtype", str),
    ("SPECDESK_QUANTIZATION", "quantization", str),
)
