"""The whole application on a local Ray cluster: the front-end deployment (console app, /v1, /metrics,
SQLite history) in front of two engine replicas, reached over HTTP on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from specdesk.engine.config import EngineConfig
from tests.distributed.conftest import deploy, serve, settings_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def base_url(
    ray_cluster: None, engine_settings: EngineConfig, http_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    from specdesk.distributed.app import ClusterConfig, build_app

    db = tmp_path_factory.mktemp("db") / "specdesk.db"
    deploy(build_app(settings_for(engine_settings, f"sqlite:///{db}"), ClusterConfig(num_replicas=2)), "specdesk", "/")
    yield f"http://127.0.0.1:{http_port}"
    serve.delete("specdesk")


def _chat(client: httpx.Client, url: str, content: str, **extra: object) -> dict:
    body = {"model": "tiny-llama", "max_tokens": 4, "messages": [{"role": "user", "content": content}], **extra}
    response = client.post(f"{url}/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_health_v1_and_metrics_through_the_front_end(base_url: str) -> None:
    with httpx.Client(timeout=60) as client:
        assert client.get(f"{base_url}/healthz").json() == {"status": "ok"}
        long = "Hello, my parcel 48213 has not arrived and the tracking page shows nothing at all since Monday."
        _chat(client, base_url, long, user="customer-17")
        # Same conversation (the `user` field): the second call reuses the first one's pages.
        second = _chat(client, base_url, long + " Any news?", user="customer-17")
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16, second["usage"]
        metrics = client.get(f"{base_url}/metrics").text
        assert "specdesk:" in metrics and "tiny-llama" in metrics
        page = client.get(f"{base_url}/")
        assert page.status_code == 200 and "gradio" in page.text.lower()


def test_session_header_routes_a_conversation(base_url: str) -> None:
    with httpx.Client(timeout=60) as client:
        cached = []
        for n in range(3):
            text = "Where is my refund? I sent the lamp back two weeks ago." + " And?" * n
            body = {"model": "tiny-llama", "max_tokens": 2, "messages": [{"role": "user", "content": text}]}
            r = client.post(f"{base_url}/v1/chat/completions", json=body, headers={"x-session-id": "conv-9"})
            assert r.status_code == 200, r.text
            cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
        assert all(c >= 16 for c in cached[1:]), cached
