"""Start the console: one engine, one database, the Gradio UI at /, the OpenAI-compatible API at /v1
and Prometheus metrics at /metrics, all in one process and one FastAPI app.

    service = build_service(settings)        # loads the model (minutes the very first time)
    app = create_app(service, settings)      # FastAPI with everything mounted
    uvicorn.run(app, host=..., port=...)     # or serve(settings) for all three
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import fastapi
import gradio as gr
import uvicorn

from specdesk.app.chat_service import ChatService
from specdesk.app.settings import Settings
from specdesk.app.style import launch_style
from specdesk.app.ui import build_demo
from specdesk.db import ChatRepository, make_engine

log = logging.getLogger("specdesk")


def build_service(settings: Settings) -> ChatService:
    """Load the model, open (and migrate) the database, and fail replies a crash left pending."""
    from specdesk.engine.llm import LLM  # torch and transformers load here, never at import

    repository = ChatRepository(make_engine(settings.database_url))
    num_failed = repository.fail_pending_messages()
    if num_failed:
        log.warning("marked %d reply(ies) left pending by the last run as errors", num_failed)
    llm = LLM(model=settings.model, **settings.engine_config())
    return ChatService(llm, repository, settings)


def create_app(service: ChatService, settings: Settings) -> fastapi.FastAPI:
    """FastAPI app with /v1 and /metrics (when their modules are installed) and the console at /."""
    app = fastapi.FastAPI(title="SpecDesk", docs_url=None, redoc_url=None)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, object]:
        # Unauthenticated on purpose (container health checks); says nothing about conversations.
        stats = service.engine_stats()
        return {"status": "ok", "model": service.model_name, "running": stats.num_running}

    _mount_api(app, service, settings)
    demo = build_demo(service)
    # The queue is sized to the engine's batch: `max_num_seqs` turns stream at once and the engine
    # batches them; quick events have their own unlimited lane (see app/ui_console.py).
    demo.queue(default_concurrency_limit=service.max_concurrent_turns, max_size=4 * service.max_concurrent_turns)
    auth = settings.check_login if settings.auth_required else None
    return gr.mount_gradio_app(
        app, demo, path="", auth=auth, auth_message="SpecDesk: sign in with your agent account.",
        show_error=True, footer_links=["api"], **launch_style(),
    )  # fmt: skip


def _mount_api(app: fastapi.FastAPI, service: ChatService, settings: Settings) -> None:
    # The API and metrics modules are another team's; the console runs without them.
    try:
        from specdesk.app.api import mount_openai_api
    except ImportError as exc:
        log.warning("OpenAI-compatible API not mounted: %s", exc)
    else:
        mount_openai_api(app, service.llm, service.model_name, list(settings.api_keys) or None)
    try:
        from specdesk.app.metrics import mount_metrics
    except ImportError as exc:
        log.warning("/metrics not mounted: %s", exc)
    else:
        mount_metrics(app, service.llm)


@dataclass
class RunningServer:
    """A server started in a background thread (tests, screenshots). `stop()` shuts it down."""

    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=2)
        if self.thread.is_alive():  # open event streams keep a graceful shutdown waiting
            self.server.force_exit = True
            self.thread.join(timeout=10)


def start_in_thread(app: fastapi.FastAPI, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Serve `app` from a daemon thread; port 0 picks a free one. Returns once it accepts requests."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="specdesk-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(server, thread, f"http://{host}:{bound}")


def serve(settings: Settings) -> None:
    """Load everything and serve until Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("loading the model (the first start converts the default model once; this can take a minute)")
    service = build_service(settings)
    app = create_app(service, settings)
    if not settings.auth_required and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a login: set SPECDESK_AGENTS or an agents file", settings.host)
    log.info("SpecDesk console on http://%s:%d (model %s)", settings.host, settings.port, service.model_name)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    finally:
        service.llm.shutdown()
