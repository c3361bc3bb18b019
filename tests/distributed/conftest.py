"""A local Ray cluster (one per test package run) with engine replicas on tiny random-weight models.

Skips every test here when `ray[serve]` is not installed (`pip install -e .[distributed]`).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="ray[serve] is not installed: pip install -e .[distributed]")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install -e .[distributed]")

from specdesk.app.settings import Settings  # noqa: E402
from specdesk.engine.config import EngineConfig  # noqa: E402
from tests.tiny_models import make_tiny_model  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="package")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="package")
def engine_settings(tiny_model: Path) -> EngineConfig:
    return EngineConfig(
        model=str(tiny_model), device="cpu", dtype="float32", num_threads=1, kv_cache_memory_gib=0.01,
        max_num_seqs=4, speculator=None,
    )  # fmt: skip


@pytest.fixture(scope="package")
def persona_engine_settings(tmp_path_factory: pytest.TempPathFactory) -> EngineConfig:
    """A tiny model with room for the console's persona system prompts (thousands of tiny-tokenizer tokens),
    batching 8 requests per replica, as the benchmark's engines do."""
    model = make_tiny_model("llama", tmp_path_factory.mktemp("tiny-4k"), max_position_embeddings=4096)
    return EngineConfig(
        model=str(model), device="cpu", dtype="float32", num_threads=1, kv_cache_memory_gib=0.05,
        max_num_seqs=8, speculator=None,
    )  # fmt: skip


@pytest.fixture(scope="package")
def http_port() -> int:
    return free_port()


@pytest.fixture(scope="package")
def ray_cluster(http_port: int) -> Iterator[None]:
    """Ray on this machine only (127.0.0.1), with logical CPUs for a few replicas; torch on one thread each."""
    env = {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # Every Ray process talks over loopback: by default its processes reach each other through the
    # host's network address (get_node_ip_address), which a loopback-only run must never use.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(
        num_cpus=8, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env},
    )  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy(app: Any, name: str, route_prefix: str | None = None) -> Any:
    return serve.run(app, name=name, route_prefix=route_prefix)


def connect(handle: Any, num_replicas: int) -> Any:
    from specdesk.distributed.remote_llm import RemoteLLM

    return asyncio.run(RemoteLLM.connect(handle, num_replicas=num_replicas))


def settings_for(engine: EngineConfig, database_url: str = "sqlite://") -> Settings:
    return Settings(engine=engine, db_url=database_url)


def record_requests(llm: Any, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every request `llm` (a RemoteLLM) is given from now on; each one's `replicas` say who served it."""
    requests: list[Any] = []
    submit = llm.submit

    def recording_submit(*args: Any, **kwargs: Any) -> str:
        request_id = submit(*args, **kwargs)
        requests.append(llm._requests[request_id])
        return str(request_id)

    monkeypatch.setattr(llm, "submit", recording_submit)
    return requests


def kill_replica(replica: str) -> None:
    """Kill the Serve replica actor whose id is `replica` (as a crash would: no restart by Ray itself)."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if replica in a["name"]]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)


def replica_states(app: str, deployment: str) -> tuple[str, dict[str, int]]:
    """What `serve.status()` says of a deployment: its status, and how many replicas are in each state."""
    overview = serve.status().applications[app].deployments[deployment]
    states = {str(getattr(state, "value", state)): n for state, n in overview.replica_states.items()}
    return str(getattr(overview.status, "value", overview.status)), states


def wait_for(condition: Any, timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
