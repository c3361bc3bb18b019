"""Build the Ray Serve application: engine replicas behind `AffinityRouter`, and the front end.

    from ray import serve
    from specdesk.distributed.app import build_app
    serve.run(build_app(settings, num_replicas=2, num_gpus_per_replica=1), route_prefix="/")

or from the shell, with settings from the environment as `specdesk serve` reads them:

    serve run specdesk.distributed.app:app_builder num_replicas=2 num_gpus_per_replica=1
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from specdesk.app.settings import Settings
from specdesk.distributed.frontend import Frontend
from specdesk.distributed.replica import EngineReplica
from specdesk.distributed.router import DEFAULT_LOAD_FACTOR, AffinityRouter


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """How the engine is spread: replicas, and what each one reserves (a GPU, or CPU cores)."""

    num_replicas: int = 2
    num_gpus_per_replica: float = 0.0
    num_cpus_per_replica: float = 1.0
    load_factor: float = DEFAULT_LOAD_FACTOR
    num_frontends: int = 1
    # Ray's default (False) would route by whichever replica answers first; affinity needs the router.
    round_robin: bool = False

    def __post_init__(self) -> None:
        if self.num_replicas < 1 or self.num_frontends < 1:
            raise ValueError(f"num_replicas and num_frontends must be >= 1, got {self}")
        if self.num_gpus_per_replica < 0 or self.num_cpus_per_replica < 0:
            raise ValueError(f"resources per replica must be >= 0, got {self}")


def engine_deployment(settings: Settings, cluster: ClusterConfig) -> Any:
    """The engine deployment, bound to its `EngineConfig`: one `LLM` per replica, at most a batch in flight."""
    router: dict[str, Any] = (
        {"request_router_class": "ray.serve.experimental.round_robin_router.RoundRobinRouter"}
        if cluster.round_robin
        else {
            "request_router_class": AffinityRouter,
            "request_router_kwargs": {"load_factor": cluster.load_factor, "batch_size": settings.engine.max_num_seqs},
        }
    )
    actor_options: dict[str, Any] = {"num_cpus": cluster.num_cpus_per_replica}
    if cluster.num_gpus_per_replica:
        actor_options["num_gpus"] = cluster.num_gpus_per_replica
    deployment: Any = serve.deployment(EngineReplica)
    deployment = deployment.options(
        name="EngineReplica",
        num_replicas=cluster.num_replicas,
        max_ongoing_requests=settings.engine.max_num_seqs,
        # Requests past every replica's batch wait in the caller's router (unbounded), not in an engine's
        # queue: there they still go to whichever replica frees a slot first when affinity allows.
        max_queued_requests=-1,
        ray_actor_options=actor_options,
        request_router_config=RequestRouterConfig(**router),
        health_check_period_s=10,
        health_check_timeout_s=30,
    )
    return deployment.bind(dataclasses.asdict(settings.engine))


def build_app(settings: Settings, cluster: ClusterConfig | None = None) -> Any:
    """The whole application: `Frontend` (ingress) bound to the engine deployment."""
    cluster = cluster or ClusterConfig()
    frontend: Any = serve.deployment(Frontend)
    frontend = frontend.options(name="Frontend", num_replicas=cluster.num_frontends, ray_actor_options={"num_cpus": 0})
    return frontend.bind(
        engine_deployment(settings, cluster), settings, cluster.num_replicas, cluster.num_frontends == 1
    )


def app_builder(args: dict[str, str]) -> Any:
    """`serve run specdesk.distributed.app:app_builder key=value ...`: ClusterConfig's fields as arguments,
    SpecDesk's settings from the environment."""
    fields = {f.name: f.type for f in dataclasses.fields(ClusterConfig)}
    unknown = set(args) - set(fields)
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)}; known: {sorted(fields)}")
    values: dict[str, Any] = {}
    for name, text in args.items():
        kind = fields[name]
        values[name] = (
            text.lower() in ("1", "true", "yes")
            if kind in (bool, "bool")
            else (int(text) if kind in (int, "int") else float(text))
        )
    return build_app(Settings.from_env(), ClusterConfig(**values))
