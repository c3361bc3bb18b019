"""The launched console with logins on: /v1 and /metrics behind the key, a /healthz that says only the
status, scrypt sign-in, throttled guessing, and session cookies that stay on this site."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import httpx
import pytest

from specdesk.app.auth import hash_password
from specdesk.app.chat_service import ChatService
from specdesk.app.server import RunningServer, create_app, start_in_thread
from specdesk.app.settings import Settings
from specdesk.engine.llm import LLM
from tests.app.console_fixtures import make_service, tiny_console_llm

KEY = "sk-console"
AGENTS = {"alice": hash_password("wonderland", n=2**10), "bob": "builder"}
_addresses = itertools.count(1)


def new_address() -> str:
    """A client address of its own per use, so one test's failures never lock another test out."""
    i = next(_addresses)
    return f"10.9.{i // 250}.{i % 250 + 1}"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatService]:
    llm = tiny_console_llm(tmp_path_factory.mktemp("security-server"))
    yield make_service(llm, tmp_path_factory.mktemp("db") / "specdesk.db", max_tokens=8)
    llm.shutdown()


@pytest.fixture(scope="module")
def server(service: ChatService) -> Iterator[RunningServer]:
    running = start_in_thread(create_app(service, Settings(agents=AGENTS, api_keys=(KEY,))))
    yield running
    running.stop()


def sign_in(server: RunningServer, user: str, password: str, address: str, **headers: str) -> httpx.Response:
    # uvicorn trusts X-Forwarded-For from loopback (its default), as it would from a local proxy.
    headers["X-Forwarded-For"] = address
    form = {"username": user, "password": password}
    return httpx.post(f"{server.url}/login", data=form, headers=headers, timeout=30)


def test_logins_without_an_api_key_do_not_start(service: ChatService) -> None:
    with pytest.raises(ValueError, match="SPECDESK_API_KEYS or pass --api-key"):
        create_app(service, Settings(agents=AGENTS))


def test_api_and_metrics_need_the_key(server: RunningServer) -> None:
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(f"{server.url}{path}", timeout=10).status_code == 401
        wrong = httpx.get(f"{server.url}{path}", headers={"Authorization": "Bearer nope"}, timeout=10)
        assert wrong.status_code == 401
        assert httpx.get(f"{server.url}{path}", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).is_success


def test_healthz_says_only_the_status(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    ok = httpx.get(f"{server.url}/healthz", timeout=10)
    assert ok.status_code == 200 and ok.json() == {"status": "ok"}
    secret = "the engine thread failed: RuntimeError: /srv/specdesk/private/path"
    monkeypatch.setattr(LLM, "error", property(lambda self: secret))
    down = httpx.get(f"{server.url}/healthz", timeout=10)
    assert down.status_code == 503
    assert down.json() == {"status": "error", "error": "the engine is not serving"}  # the detail stays in the log


def test_scrypt_and_plain_passwords_sign_in(server: RunningServer) -> None:
    assert sign_in(server, "alice", "wonderland", new_address()).status_code == 200
    assert sign_in(server, "alice", "nope", new_address()).status_code == 400
    assert sign_in(server, "bob", "builder", new_address()).status_code == 200


def test_guessing_one_name_is_throttled(server: RunningServer) -> None:
    for _ in range(5):  # spread over addresses: only the per-name count can stop this
        assert sign_in(server, "bob", "guess", new_address()).status_code == 400
    locked = sign_in(server, "bob", "builder", new_address())  # even the right password, for now
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) > 0
    assert sign_in(server, "alice", "wonderland", new_address()).status_code == 200  # others are unaffected


def test_guessing_from_one_address_is_throttled(server: RunningServer) -> None:
    address = new_address()
    for i in range(20):  # a new name each time: only the per-address count can stop this
        assert sign_in(server, f"guess{i}", "pw", address).status_code == 400
    assert sign_in(server, "alice", "wonderland", address).status_code == 429
    assert sign_in(server, "alice", "wonderland", new_address()).status_code == 200


def test_session_cookies_stay_on_this_site(server: RunningServer) -> None:
    def cookies(**headers: str) -> list[str]:
        r = sign_in(server, "alice", "wonderland", new_address(), **headers)
        assert r.status_code == 200
        return r.headers.get_list("set-cookie")

    plain = cookies()
    assert len(plain) == 2 and all("SameSite=Lax" in c and "samesite=none" not in c.lower() for c in plain)
    # Over https (here: a proxy that terminated TLS says so), both session cookies are Secure.
    https = cookies(**{"X-Forwarded-Proto": "https"})
    assert len(https) == 2 and all("Secure" in c.split("; ") and "SameSite=Lax" in c for c in https)


def test_a_signed_in_session_still_works(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/config").status_code == 401
        r = http.post("/login", data={"username": "alice", "password": "wonderland"})
        assert r.status_code == 200
        assert http.get("/config").status_code == 200  # the Lax cookie is sent back on this site
