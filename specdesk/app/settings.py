"""Console settings: one frozen object built once at start from defaults, environment and CLI flags.

Nothing here runs at import time: `Settings.from_env()` reads the environment when the CLI calls it.

Environment variables (all optional; CLI flags win):

    SPECDESK_MODEL, SPECDESK_SPECULATOR, SPECDESK_DEVICE, SPECDESK_DTYPE, SPECDESK_QUANTIZATION (the
    engine's: see `EngineConfig`; "none", "off" or "" turn speculation or quantization off),
    SPECDESK_DB, SPECDESK_DATA_DIR, SPECDESK_HOST, SPECDESK_PORT,
    SPECDESK_API_KEYS (comma separated; required for `serve` when logins are on),
    SPECDESK_METRICS_KEY_REQUIRED (1/true: /metrics needs an API key too; always so with logins on),
    SPECDESK_AGENTS ("alice:<entry>,bob:<entry>"), SPECDESK_AGENTS_FILE (one "name:<entry>" per line),
    where an entry is a `specdesk hash-password` line ("scrypt:..."), or, accepted with a warning, a plain
    password or "sha256:<hex>",
    SPECDESK_MAX_TOKENS, SPECDESK_TEMPERATURE, SPECDESK_TOP_P, SPECDESK_REPETITION_PENALTY (1 turns it off),
    SPECDESK_COMPANY, SPECDESK_AGENT_NAME
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from specdesk.app.auth import check_password_entry, is_weak_entry, verify_password
from specdesk.engine.config import EngineConfig  # plain dataclass: no torch
from specdesk.engine.sampling_params import SamplingParams  # likewise

# The console's and the side-by-side view's default (transformers' repetition penalty): greedy replies of the
# default model fell into a loop (the same 4 tokens 4 times or more) on a share of held-out customer turns
# without it; `python -m benchmarks.loops` measures every candidate (docs/benchmarks.md has the figures).
DEFAULT_REPETITION_PENALTY = 1.1
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
ENGINE_FIELDS = frozenset(f.name for f in fields(EngineConfig))
_OFF_WORDS = ("", "none", "off")


def none_if_off(raw: str | None) -> str | None:
    """The one reading of "none", "off" and "" (any case, spaces around): None; anything else stripped."""
    if raw is None or raw.strip().lower() in _OFF_WORDS:
        return None
    return raw.strip()


@dataclass(frozen=True)
class Settings:
    """Everything the console needs to start. `engine` is the engine's own frozen config, validated
    when the settings are built, so a bad dtype or device fails before any model loads.

    `agents` maps a login name to a password entry (see app/auth.py); empty means no login screen
    (fine on a laptop, not on a shared host). `api_keys` guard /v1, and /metrics when
    `metrics_key_required` or logins are on.
    """

    # quantization "auto": the console and `specdesk serve` take the fastest CPU path, the C kernels where the CPU
    # has AVX-512 VNNI (int8) or AVX2 (the checkpoint's own Q4_1 weights where it holds them, int8 for the rest;
    # see EngineConfig); the library's LLM() stays unquantized by default.
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(quantization="auto"))
    db_url: str | None = None
    data_dir: Path = field(default_factory=lambda: Path.home() / ".local" / "share" / "specdesk")
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_keys: tuple[str, ...] = ()
    metrics_key_required: bool = False
    agents: Mapping[str, str] = field(default_factory=dict)
    company: str = "Northwind"  # fills {company} in the system prompts and macros
    agent_name: str = "Alex"  # the name the drafted replies sign with
    max_tokens: int = 384
    # Sampled drafts by default: greedy decoding of a small model loops on one sentence. Speculation
    # keeps the sampled distribution unchanged (rejection sampling), so it stays on.
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 1.0 <= self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in [1, 2] (1 turns it off), got {self.repetition_penalty}")
        # The engine's own rules (NaN, inf, a temperature in (0, 1e-5)): every turn would fail on them later.
        SamplingParams(temperature=self.temperature, top_p=self.top_p, repetition_penalty=self.repetition_penalty)
        if any(not key.strip() for key in self.api_keys):  # e.g. --api-key "$KEY" with KEY unset
            raise ValueError("an API key is empty: /v1 would take no key at all")
        for name, secret in self.agents.items():
            if not name or ":" in name or not secret:
                raise ValueError(f"agent entries need a name without ':' and a password, got {name!r}")
            try:
                check_password_entry(secret)
            except ValueError as exc:
                raise ValueError(f"agent {name!r}: {exc}") from None

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL: the configured one, or a SQLite file in the data directory."""
        return self.db_url or f"sqlite:///{self.data_dir / 'specdesk.db'}"

    @property
    def auth_required(self) -> bool:
        return bool(self.agents)

    @property
    def metrics_need_key(self) -> bool:
        """/metrics shows load and usage: open only on a console without logins, unless asked."""
        return self.metrics_key_required or self.auth_required

    @property
    def weak_password_agents(self) -> list[str]:
        """Agents whose entry is a plain password or an unsalted sha256 (warned about at start)."""
        return sorted(name for name, entry in self.agents.items() if is_weak_entry(entry))

    def check_serving(self) -> None:
        """ValueError when serving these settings would leave a door open: /v1 (or /metrics) without a
        key on a console whose UI needs a login."""
        if self.auth_required and not self.api_keys:
            raise ValueError(
                "logins are on (SPECDESK_AGENTS / --agents-file) but /v1 has no API key: the API would be "
                "open to anyone who can reach the console. Set SPECDESK_API_KEYS or pass --api-key."
            )
        if self.metrics_key_required and not self.api_keys:
            raise ValueError("--metrics-key-required needs an API key: set SPECDESK_API_KEYS or pass --api-key")

    def check_login(self, username: str, password: str) -> bool:
        """True when `password` matches `username`'s entry (constant time for its kind; slow for scrypt)."""
        return verify_password(password, self.agents.get(username))

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with the non-None overrides applied (CLI flags over environment). Engine fields
        (model, speculator, device, dtype, quantization, enforce_eager, ...) go into `engine`."""
        given = {k: v for k, v in overrides.items() if v is not None}
        engine = {k: _engine_value(k, given.pop(k)) for k in list(given) if k in ENGINE_FIELDS}
        return replace(self, engine=replace(self.engine, **engine), **given) if engine else replace(self, **given)

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
        engine = {k: values.pop(k) for k in list(values) if k in ENGINE_FIELDS}
        settings = cls(**values)
        try:
            return settings.with_overrides(**engine)
        except ValueError as exc:  # EngineConfig's own check, e.g. an unknown dtype
            raise ValueError(f"{', '.join(f'SPECDESK_{k.upper()}' for k in engine)}: {exc}") from None


def _engine_value(name: str, value: Any) -> Any:
    # "none"/"off" spell "no speculator"/"no quantization"; the model name is taken as given.
    if name in ("speculator", "quantization") and isinstance(value, str):
        return none_if_off(value)
    if isinstance(value, str):
        return value.strip()
    return value


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
    """Agents from a settings file: one "name:<entry>" per line (see app/auth.py for the entries)."""
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


def _flag(raw: str) -> bool:
    word = raw.strip().lower()
    if word not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError("must be 1/true/yes/on or 0/false/no/off")
    return word in ("1", "true", "yes", "on")


# An empty variable counts as unset. Engine fields are checked by EngineConfig when the settings are built.
_ENV_FIELDS: tuple[tuple[str, str, Any], ...] = (
    ("SPECDESK_MODEL", "model", str),
    ("SPECDESK_SPECULATOR", "speculator", str),
    ("SPECDESK_DEVICE", "device", str),
    ("SPECDESK_DTYPE", "dtype", str),
    ("SPECDESK_QUANTIZATION", "quantization", str),
    ("SPECDESK_DB", "db_url", str),
    ("SPECDESK_DATA_DIR", "data_dir", lambda raw: Path(raw).expanduser()),
    ("SPECDESK_HOST", "host", str),
    ("SPECDESK_PORT", "port", _positive_int),
    ("SPECDESK_API_KEYS", "api_keys", _api_keys),
    ("SPECDESK_METRICS_KEY_REQUIRED", "metrics_key_required", _flag),
    ("SPECDESK_MAX_TOKENS", "max_tokens", _positive_int),
    ("SPECDESK_TEMPERATURE", "temperature", float),
    ("SPECDESK_TOP_P", "top_p", float),
    ("SPECDESK_REPETITION_PENALTY", "repetition_penalty", float),
    ("SPECDESK_COMPANY", "company", str),
    ("SPECDESK_AGENT_NAME", "agent_name", str),
)
