"""Shared by the API and metrics tests: a tiny in-process engine and a real uvicorn server on loopback."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from specdesk.engine.llm import LLM
from specdesk.engine.outputs import StreamDelta
from tests.helpers import wait_idle as wait_idle  # re-exported: the API and metrics tests import it here
from tests.tiny_models import make_tiny_model

NUM_BLOCKS = 96  # small pool: "every page is free again" is a meaningful check


def tiny_llm(tmp: Path) -> LLM:
    """A random-weight qwen2 (ChatML template, EOS never greedy-picked) on a small page pool."""
    path = make_tiny_model("qwen2", tmp)
    return LLM(model=str(path), dtype="float32", device="cpu", num_blocks=NUM_BLOCKS, attention_backend="torch")


@contextlib.contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run `app` on 127.0.0.1 at a free port in a daemon thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


class FinalDeltas:
    """Listener that keeps every request's final delta (finish reason, metrics) for assertions."""

    def __init__(self, llm: LLM) -> None:
        self.finals: dict[str, StreamDelta] = {}
        llm.add_listener(self)

    def __call__(self, delta: StreamDelta) -> None:
        if delta.finished:
            self.finals[delta.request_id] = delta

    def wait_new(self, before: set[str], timeout_s: float = 10.0) -> list[StreamDelta]:
        """Final deltas of requests not in `before`, waiting until at least one arrives."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            new = [d for rid, d in list(self.finals.items()) if rid not in before]
            if new:
                return new
            time.sleep(0.01)
        raise AssertionError("no request finished in time")
