"""Passwords, sign-in throttling, cache salts and the serving checks, without a server."""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import pytest

from specdesk.app import auth
from specdesk.app.auth import ApiKeys, LoginThrottle, hash_password, verify_password
from specdesk.app.cli import main, run_hash_password
from specdesk.app.settings import Settings

FAST = {"n": 2**10, "r": 8, "p": 1}  # scrypt at test speed; the format and checks are the same


def test_scrypt_entries_are_salted_and_verified() -> None:
    entry = hash_password("s3cret pass", **FAST)
    _, n, r, p, salt, digest = entry.split(":")
    assert (int(n), int(r), int(p)) == (2**10, 8, 1) and salt and digest
    assert hash_password("s3cret pass", **FAST) != entry  # a fresh salt each time
    assert verify_password("s3cret pass", entry) and not verify_password("s3cret pas", entry)
    assert not verify_password(entry, entry)  # the stored line is not itself a password
    default = hash_password("pw")
    assert default.startswith(f"scrypt:{auth.SCRYPT_N}:{auth.SCRYPT_R}:{auth.SCRYPT_P}:")
    assert verify_password("pw", default)


def test_legacy_entries_still_work_and_are_flagged() -> None:
    legacy = "sha256:" + hashlib.sha256(b"old").hexdigest()
    settings = Settings(agents={"a": "plain", "b": legacy, "c": hash_password("new", **FAST)})
    assert settings.check_login("a", "plain") and settings.check_login("b", "old") and settings.check_login("c", "new")
    assert not settings.check_login("b", legacy) and not settings.check_login("nobody", "plain")
    assert settings.weak_password_agents == ["a", "b"]


@pytest.mark.parametrize(
    "entry",
    [
        "scrypt:1024:8:1:bm90LWI2NA",
        "scrypt:1000:8:1:c2FsdHNhbHQ=:aGFzaGhhc2hoYXNoaGFzaA==",
        "scrypt:1024:8",
        "sha256:xyz",
    ],
)
def test_malformed_entries_fail_at_start(entry: str) -> None:
    with pytest.raises(ValueError, match="agent 'a'"):
        Settings(agents={"a": entry})


def test_a_huge_scrypt_cost_is_refused() -> None:
    entry = hash_password("pw", **FAST).replace(f"scrypt:{2**10}:", f"scrypt:{2**24}:")
    with pytest.raises(ValueError, match="power of 2"):
        Settings(agents={"a": entry})


def test_hash_password_command(capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    assert run_hash_password(io.StringIO("correct horse\n"), out) == 0
    line = out.getvalue().strip()
    assert line.startswith("scrypt:") and verify_password("correct horse", line)
    assert run_hash_password(io.StringIO("\n"), io.StringIO()) == 2
    assert "empty" in capsys.readouterr().err


def test_throttle_locks_after_failures_and_forgets_after_the_window() -> None:
    throttle = LoginThrottle(max_failures=3, window_s=60)
    for t in (0.0, 1.0):
        throttle.record_failure(["user:alice"], now=t)
    assert throttle.retry_after(["user:alice"], now=2.0) is None
    throttle.record_failure(["user:alice"], now=2.0)
    assert throttle.retry_after(["user:alice"], now=3.0) == pytest.approx(57.0)
    assert throttle.retry_after(["user:bob"], now=3.0) is None
    assert throttle.retry_after(["user:alice"], now=60.5) is None  # the first failure left the window
    throttle.clear("user:alice")
    assert throttle.retry_after(["user:alice"], now=3.0) is None


def test_throttle_memory_is_bounded() -> None:
    throttle = LoginThrottle(max_failures=1, window_s=60, max_keys=100)
    for i in range(1000):
        throttle.record_failure([f"address:10.0.{i // 256}.{i % 256}"], now=1.0)
    assert len(throttle._failures) == 100
    assert throttle.retry_after(["address:10.0.3.231"], now=2.0) is not None  # the newest are kept


def test_each_key_is_its_own_cache_tenant() -> None:
    keys = ApiKeys(["sk-a", "sk-b"])
    a, b = keys.tenant("Bearer sk-a"), keys.tenant("bearer sk-b")
    assert a and b and a != b and "sk-a" not in a
    assert keys.tenant("Bearer sk-c") is None and keys.tenant(None) is None and keys.tenant("sk-a") is None
    assert ApiKeys([]).tenant(None) == auth.OPEN_API_CACHE_SALT
    # A client salt narrows within the tenant; no client salt reaches another tenant or the console.
    assert auth.tenant_cache_salt(a, None) == a
    assert auth.tenant_cache_salt(a, "x") != auth.tenant_cache_salt(b, "x")
    console = {auth.console_cache_salt(None), auth.console_cache_salt("alice"), auth.console_cache_salt("bob")}
    assert len(console) == 3 and not any(s.startswith("api:") for s in console)
    assert auth.console_cache_salt("alice") == auth.console_cache_salt("alice")  # stable across restarts


def test_logins_without_an_api_key_refuse_to_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match="SPECDESK_API_KEYS or pass --api-key"):
        Settings(agents={"alice": "pw"}).check_serving()
    Settings(agents={"alice": "pw"}, api_keys=("k",)).check_serving()
    Settings().check_serving()  # a laptop console without logins may keep /v1 open
    with pytest.raises(ValueError, match="metrics-key-required"):
        Settings(metrics_key_required=True).check_serving()
    # The CLI says so and stops before loading any model.
    monkeypatch.setenv("SPECDESK_AGENTS", "alice:pw")
    monkeypatch.setenv("SPECDESK_DATA_DIR", str(tmp_path))
    assert main(["serve"]) == 2
    assert "SPECDESK_API_KEYS" in capsys.readouterr().err


def test_metrics_key_setting() -> None:
    assert not Settings().metrics_need_key
    assert Settings(agents={"a": "pw"}).metrics_need_key
    assert Settings.from_env({"SPECDESK_METRICS_KEY_REQUIRED": "1"}).metrics_need_key
    with pytest.raises(ValueError, match="SPECDESK_METRICS_KEY_REQUIRED"):
        Settings.from_env({"SPECDESK_METRICS_KEY_REQUIRED": "maybe"})


def test_weak_passwords_are_warned_about_at_start(caplog: pytest.LogCaptureFixture) -> None:
    from specdesk.app import server

    settings = Settings(agents={"alice": "plain"}, api_keys=("k",))
    with caplog.at_level(logging.WARNING, logger="specdesk"), pytest.raises(_Stop):
        server.create_app(_StopService(), settings)  # type: ignore[arg-type]
    assert "alice" in caplog.text and "hash-password" in caplog.text


class _Stop(Exception):
    pass


class _StopService:
    """create_app's checks and warnings come first; this ends the call at the first use of the service."""

    def __getattr__(self, name: str) -> object:
        raise _Stop(name)
