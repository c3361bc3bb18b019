"""Settings from defaults, environment and CLI flags; agent logins from a file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from specdesk.app.cli import build_parser, settings_from_args
from specdesk.app.settings import Settings, load_agents_file, none_if_off
from specdesk.engine.config import EngineConfig


def test_defaults_use_a_sqlite_file_in_the_data_dir(tmp_path: Path) -> None:
    settings = Settings.from_env({"SPECDESK_DATA_DIR": str(tmp_path)})
    assert settings.database_url == f"sqlite:///{tmp_path / 'specdesk.db'}"
    assert settings.engine == EngineConfig(quantization="auto") and not settings.auth_required
    assert settings.host == "127.0.0.1" and settings.port == 7860


def test_environment_is_read_only_when_asked(tmp_path: Path) -> None:
    env = {
        "SPECDESK_PORT": "9000",
        "SPECDESK_API_KEYS": "k1, k2",
        "SPECDESK_AGENTS": "alice:pw1,bob:pw2",
        "SPECDESK_DB": "sqlite:///x.db",
    }
    settings = Settings.from_env(env)
    assert settings.port == 9000 and settings.api_keys == ("k1", "k2") and settings.db_url == "sqlite:///x.db"
    assert settings.check_login("alice", "pw1") and not settings.check_login("alice", "pw2")
    assert not settings.check_login("carol", "pw1")
    with pytest.raises(ValueError, match="SPECDESK_PORT"):
        Settings.from_env({"SPECDESK_PORT": "zero"})


def test_agents_file_with_hashed_passwords(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"s3cret").hexdigest()
    path = tmp_path / "agents.txt"
    path.write_text(f"# SpecDesk agents\nalice:plain-pw\nbob:sha256:{digest}\n\n", encoding="utf-8")
    agents = load_agents_file(path)
    settings = Settings(agents=agents)
    assert settings.check_login("bob", "s3cret") and not settings.check_login("bob", f"sha256:{digest}")
    assert settings.check_login("alice", "plain-pw")
    path.write_text("no-colon-here\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 1"):
        load_agents_file(path)
    with pytest.raises(ValueError, match="cannot read"):
        load_agents_file(tmp_path / "missing.txt")


def test_cli_flags_override_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECDESK_PORT", "9000")
    monkeypatch.setenv("SPECDESK_MODEL", "from-env")
    agents = tmp_path / "agents.txt"
    agents.write_text("alice:pw\n", encoding="utf-8")
    flags = ["serve", "--port", "8123", "--db", "sqlite:///y.db", "--api-key", "a", "--api-key", "b"]
    args = build_parser().parse_args([*flags, "--agents-file", str(agents)])
    settings = settings_from_args(args)
    assert settings.port == 8123 and settings.engine.model == "from-env" and settings.db_url == "sqlite:///y.db"
    assert settings.api_keys == ("a", "b") and settings.check_login("alice", "pw")


def test_invalid_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="port"):
        Settings(port=70000)
    with pytest.raises(ValueError, match="agent"):
        Settings(agents={"": "pw"})
    # What the engine refuses is refused at start, not at every turn after minutes of loading.
    for bad, message in [({"temperature": float("nan")}, "finite"), ({"temperature": 5e-6}, "at least 1e-05"),
                         ({"temperature": float("inf")}, "finite"), ({"top_p": 0.0}, "top_p")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            Settings(**bad)  # type: ignore[arg-type]
    # An empty key (--api-key "$KEY" with KEY unset) would leave /v1 without one.
    args = build_parser().parse_args(["serve", "--api-key", ""])
    with pytest.raises(ValueError, match="API key is empty"):
        settings_from_args(args, {})


def test_speculator_default_is_the_engines() -> None:
    assert Settings().engine.speculator == EngineConfig().speculator == "auto"
    for off in ("none", "OFF", " none "):
        assert Settings.from_env({"SPECDESK_SPECULATOR": off}).engine.speculator is None
        assert (
            settings_from_args(build_parser().parse_args(["serve", "--speculator", off]), {}).engine.speculator is None
        )
    assert Settings.from_env({"SPECDESK_SPECULATOR": ""}).engine.speculator == "auto"  # empty = unset
    assert Settings.from_env({"SPECDESK_SPECULATOR": "ngram"}).engine.speculator == "ngram"


def test_quantization_flag_reaches_the_engine_config() -> None:
    # The console and `serve` default to "auto" (the fastest CPU path); the library's EngineConfig to None.
    assert Settings().engine.quantization == "auto"
    assert settings_from_args(build_parser().parse_args(["serve"]), {}).engine.quantization == "auto"
    for choice in ("int4", "int8"):
        args = build_parser().parse_args(["serve", "--quantization", choice])
        assert settings_from_args(args, {}).engine.quantization == choice
        assert Settings.from_env({"SPECDESK_QUANTIZATION": choice}).engine.quantization == choice
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quantization", "int3"])
    with pytest.raises(ValueError, match="SPECDESK_QUANTIZATION"):
        Settings.from_env({"SPECDESK_QUANTIZATION": "int3"})
    assert Settings.from_env({"SPECDESK_QUANTIZATION": "none"}).engine.quantization is None
    args = build_parser().parse_args(["serve", "--quantization", "none"])
    assert settings_from_args(args, {}).engine.quantization is None
    assert settings_from_args(build_parser().parse_args(["serve"]), {}).engine.enforce_eager is False
    args = build_parser().parse_args(["chat", "--enforce-eager"])
    assert settings_from_args(args, {}).engine.enforce_eager is True


def test_settings_hold_one_engine_config() -> None:
    env = {"SPECDESK_MODEL": "m", "SPECDESK_DEVICE": "cpu", "SPECDESK_DTYPE": "float32"}
    settings = Settings.from_env(env)
    assert settings.engine == EngineConfig(model="m", device="cpu", dtype="float32", quantization="auto")
    # EngineConfig's own validation runs when the settings are built, naming the variable.
    with pytest.raises(ValueError, match=r"SPECDESK_DTYPE.*dtype must be"):
        Settings.from_env({"SPECDESK_DTYPE": "float8"})
    flags = build_parser().parse_args(["serve", "--device", "cpu", "--model", "x"])
    expected = EngineConfig(model="x", device="cpu", dtype="float32", quantization="auto")
    assert settings_from_args(flags, env).engine == expected


def test_one_reading_of_off() -> None:
    assert [none_if_off(w) for w in (None, "", "  ", "none", "None", "off", " OFF ")] == [None] * 7
    assert none_if_off(" int4 ") == "int4"


def test_repetition_penalty_default_env_flag_and_bounds() -> None:
    from specdesk.app.settings import DEFAULT_REPETITION_PENALTY

    assert Settings().repetition_penalty == DEFAULT_REPETITION_PENALTY > 1.0
    assert Settings.from_env({"SPECDESK_REPETITION_PENALTY": "1"}).repetition_penalty == 1.0
    args = build_parser().parse_args(["serve", "--repetition-penalty", "1.2"])
    assert settings_from_args(args, {}).repetition_penalty == 1.2
    for bad in (0.5, 2.5):
        with pytest.raises(ValueError, match="repetition_penalty"):
            Settings(repetition_penalty=bad)
