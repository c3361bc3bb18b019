"""The launched console on loopback: gradio_client streaming, 8 agents batched at once, /v1, /metrics, login."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gradio_client import Client

from specdesk.app.chat_service import ChatService
from specdesk.app.server import RunningServer, create_app, start_in_thread
from specdesk.app.settings import Settings
from specdesk.db import MessageStatus, Role
from specdesk.engine.llm import LLM
from tests.app.console_fixtures import make_service, tiny_console_llm, wait_engine_idle

NUM_AGENTS = 8


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    engine = tiny_console_llm(tmp_path_factory.mktemp("server"))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def service(llm: LLM, tmp_path_factory: pytest.TempPathFactory) -> ChatService:
    return make_service(llm, tmp_path_factory.mktemp("db") / "specdesk.db", max_tokens=160)


@pytest.fixture(scope="module")
def server(service: ChatService) -> Iterator[RunningServer]:
    running = start_in_thread(create_app(service, Settings(api_keys=("test-key",))))
    yield running
    running.stop()


def chatbot_of(outputs: Any) -> list[dict[str, Any]]:
    """The chatbot value among a /send update's outputs (the only list of role/content dicts)."""
    for value in outputs:
        if isinstance(value, dict) and "feedback_value" in value:  # a whole-component update
            value = value["value"]
        if isinstance(value, list) and value and isinstance(value[0], dict) and "role" in value[0]:
            return value
    raise AssertionError(f"no chatbot in {outputs!r:.300}")


def reply_text(chatbot: list[dict[str, Any]]) -> str:
    content = chatbot[-1]["content"]
    return "".join(part.get("text", "") for part in content) if isinstance(content, list) else str(content)


def test_send_streams_through_gradio_client(server: RunningServer, service: ChatService) -> None:
    client = Client(server.url, verbose=False)
    job = client.submit("Where is my order 48213?", "retail", "Dana", "", api_name="/send")
    replies = [reply_text(chatbot_of(update)) for update in job]
    assert job.status().success
    growing = [r for r in replies if r.strip(" ▍")]
    assert len(set(growing)) >= 3, f"expected several streamed updates, got {len(set(growing))}"
    assert all(len(a) <= len(b) + 2 for a, b in itertools.pairwise(growing))
    summary = service.repository.list_conversations("48213")[0]
    assert summary.customer_name == "Dana" and summary.persona == "retail"
    messages = service.repository.get_conversation(summary.id).messages
    assert [(m.role, m.status) for m in messages] == [
        (Role.USER, MessageStatus.COMPLETE),
        (Role.ASSISTANT, MessageStatus.COMPLETE),
    ]
    assert messages[1].metrics and messages[1].metrics["num_generated_tokens"] == 160


def test_eight_agents_stream_at_once(server: RunningServer, llm: LLM) -> None:
    """The queue admits every agent's turn together, and the engine batches all of them."""
    peak = {"running": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak["running"] = max(peak["running"], llm.stats().num_running)
            time.sleep(0.005)

    first_token: dict[int, float] = {}
    finished: dict[int, float] = {}

    def agent(i: int) -> None:
        client = Client(server.url, verbose=False)
        job = client.submit(f"Agent {i}: my parcel is late", "general", f"Customer {i}", "", api_name="/send")
        for update in job:
            if i not in first_token and reply_text(chatbot_of(update)).strip(" ▍"):
                first_token[i] = time.monotonic()
        finished[i] = time.monotonic()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    agents = [threading.Thread(target=agent, args=(i,)) for i in range(NUM_AGENTS)]
    for thread in agents:
        thread.start()
    for thread in agents:
        thread.join(timeout=180)
    done.set()
    assert len(finished) == NUM_AGENTS, "some agent's stream never ended"
    assert len(first_token) == NUM_AGENTS
    # All progress together: every agent saw tokens before the first agent's reply was complete.
    assert max(first_token.values()) < min(finished.values())
    assert peak["running"] >= NUM_AGENTS, f"engine ran at most {peak['running']} requests at once"
    wait_engine_idle(llm)


def test_openai_api_and_metrics_are_mounted(server: RunningServer) -> None:
    headers = {"Authorization": "Bearer test-key"}
    models = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10)
    assert models.status_code == 200 and models.json()["data"]
    assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 401
    metrics = httpx.get(f"{server.url}/metrics", timeout=10)
    assert metrics.status_code == 200 and "specdesk" in metrics.text.lower()
    page = httpx.get(f"{server.url}/", timeout=10)
    assert page.status_code == 200 and "SpecDesk" in page.text
    health = httpx.get(f"{server.url}/healthz", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}  # nothing beyond the status


def test_login_is_required_when_agents_are_configured(service: ChatService) -> None:
    settings = Settings(agents={"alice": "wonderland"}, api_keys=("test-key",))
    running = start_in_thread(create_app(service, settings))
    try:
        assert httpx.get(f"{running.url}/config", timeout=10).status_code == 401
        assert httpx.get(f"{running.url}/healthz", timeout=10).status_code == 200
        with httpx.Client(base_url=running.url, timeout=10) as http:
            bad = http.post("/login", data={"username": "alice", "password": "nope"})
            assert bad.status_code == 400
            good = http.post("/login", data={"username": "alice", "password": "wonderland"})
            assert good.status_code == 200
            assert http.get("/config").status_code == 200
    finally:
        running.stop()


def test_build_demo_does_not_touch_the_engine(tmp_path: Path) -> None:
    """build_demo only lays out components: a service whose engine is never called is enough."""
    from specdesk.app.ui import build_demo

    class NoEngine:
        def __getattr__(self, name: str) -> Any:
            if name == "config":
                return type("C", (), {"speculator": None, "max_num_seqs": 4, "max_model_len": None})()
            facts = {"model_name": "stub", "dtype_name": "bfloat16", "max_model_len": 512}
            if name in facts:  # static facts, read for labels; nothing runs
                return facts[name]
            raise AssertionError(f"build_demo touched the engine: {name}")

    service = make_service(NoEngine(), tmp_path / "x.db")  # type: ignore[arg-type]
    demo = build_demo(service)
    assert demo.title.startswith("SpecDesk")


def test_signed_in_agents_see_only_their_own_conversations(service: ChatService) -> None:
    """With login on, /send stores the conversation under the signed-in agent and lists only theirs."""
    settings = Settings(agents={"alice": "wonderland", "bob": "builder"}, api_keys=("test-key",))
    running = start_in_thread(create_app(service, settings))
    try:
        sidebars = {}
        for agent, password in settings.agents.items():
            client = Client(running.url, auth=(agent, password), verbose=False)
            *_, last = client.submit(f"Refund for {agent} 70707", "general", "", "", api_name="/send")
            sidebars[agent] = next(v["choices"] for v in last if isinstance(v, dict) and "choices" in v)
    finally:
        running.stop()
    repo = service.repository
    owned = {agent: repo.list_conversations("70707", agent=agent) for agent in settings.agents}
    assert [c.title for c in owned["alice"]] == ["Refund for alice 70707"]
    assert [c.title for c in owned["bob"]] == ["Refund for bob 70707"]
    assert {c.agent for c in repo.list_conversations("70707")} == {"alice", "bob"}
    # bob's sidebar lists only bob's conversation, none of alice's nor the login-off ones.
    assert [choice[1] for choice in sidebars["bob"]] == [owned["bob"][0].id]
    wait_engine_idle(service.llm)
