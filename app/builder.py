"""build_app(args) -> the Serve application: validate AppConfig, bind the deployments.

Ingress and Scheduler once; per logical node (`nodes:` in the config) a TrafficManager
(the node's KV store and SNIC) and its PrefillEngine / DecodeEngine replicas, named
`<Deployment>-<node>`. Code holds each deployment's defaults (a 2-core CPU box: the engines
take one CPU each, everything else none); `serve_config.yaml`'s `deployments:` entries
override them by name.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from app.config import AppConfig
from app.ingress import Ingress
from deployments.decode.deployment import DecodeEngine
from deployments.prefill.deployment import PrefillEngine
from deployments.scheduler.deployment import Scheduler
from deployments.traffic.deployment import TrafficManager

PINNED_ROUTER = RequestRouterConfig(
    request_router_class="deployments.routing:ReplicaPinnedRouter",
    request_routing_stats_period_s=1.0,
    request_routing_stats_timeout_s=5.0,
)


def build_app(args: dict[str, Any] | None = None) -> Application:
    config = AppConfig.model_validate(args or {})
    model_dir = config.model.path.expanduser()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"model directory {model_dir} has no config.json: run `make fetch` (or "
            "`python -m ops model fetch`) for the default model, or set args.model.path"
        )
    light = {"num_cpus": 0}
    control = light | (
        {"resources": config.control_ray_resources} if config.control_ray_resources else {}
    )
    quiet = {"enable_access_log": False}  # periodic load reports would drown the logs
    scheduler = serve.deployment(
        Scheduler,
        name="Scheduler",
        ray_actor_options=control,
        logging_config=quiet,
        max_ongoing_requests=1000,
    ).bind(
        config.scheduler.stale_after_s,
        config.scheduler.policy_config(),
        config.tracing,
        config.scheduler.planned_ttl_s,
    )
    engine_options: dict[str, Any] = {
        "request_router_config": PINNED_ROUTER,
        "health_check_period_s": 5,
        "graceful_shutdown_timeout_s": 5,
    }
    nodes: dict[str, dict[str, Any]] = {}
    for node in config.nodes:
        # NOTE: a logical node's deployments carry its name; `ray_resources` pins them to
        # one Ray node on a cluster (on one machine they share it and emulate a cluster).
        pinned = {"resources": dict(node.ray_resources)} if node.ray_resources else {}
        engine = config.engine_replica(node.name)
        handles: dict[str, Any] = {}
        handles["traffic"] = traffic = serve.deployment(
            TrafficManager,
            name=f"TrafficManager-{node.name}",
            ray_actor_options=light | pinned,
            logging_config=quiet,
            max_ongoing_requests=1000,
        ).bind(node.name, engine, config.kvstore, node.snic_bandwidth, scheduler)
        if node.prefill:
            handles["prefill"] = serve.deployment(
                PrefillEngine,
                name=f"PrefillEngine-{node.name}",
                num_replicas=node.prefill,
                max_ongoing_requests=256,
                ray_actor_options={"num_cpus": config.engine.num_cpus} | pinned,
                **engine_options,
            ).bind(engine, scheduler, traffic)
        if node.decode:
            handles["decode"] = serve.deployment(
                DecodeEngine,
                name=f"DecodeEngine-{node.name}",
                num_replicas=node.decode,
                max_ongoing_requests=512,
                ray_actor_options={"num_cpus": config.engine.num_cpus} | pinned,
                **engine_options,
            ).bind(engine, scheduler, traffic, config.kvstore.enabled)
        nodes[node.name] = handles
    return serve.deployment(
        Ingress, name="Ingress", ray_actor_options=control, max_ongoing_requests=1024
    ).bind(config, scheduler, nodes)
