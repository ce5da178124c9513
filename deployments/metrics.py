"""Every dualpath metric in one place: name, kind, unit, labels, and one recorder.

`Metrics("ray")` records through `ray.util.metrics`, so the series appear in the Ray
dashboard's metrics view and on its Prometheus endpoint (Ray prefixes them with `ray_`;
`ops/dashboards/dualpath.json` is the Grafana board over them). `Metrics("memory")` keeps
them in dicts, for tests and for code running without Ray. Each deployment creates its own
instance and passes it to the plain classes it wraps.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal

Kind = Literal["counter", "gauge", "histogram"]
LATENCY_BOUNDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128]

SPECS: dict[str, tuple[Kind, str, tuple[str, ...]]] = {
    "dualpath_ttft_seconds": ("histogram", "time to the first token", ("service_tier",)),
    "dualpath_tpot_seconds": (
        "histogram",
        "time per output token after the first",
        ("service_tier",),
    ),
    "dualpath_requests_total": ("counter", "requests by outcome", ("service_tier", "status")),
    "dualpath_admission_rejections_total": (
        "counter",
        "requests refused (429/503/408/401/403/...) by error code",
        ("reason", "service_tier"),
    ),
    "dualpath_queue_depth": ("gauge", "requests waiting for admission", ("service_tier",)),
    "dualpath_prompt_tokens_total": ("counter", "prompt tokens of served requests", ()),
    "dualpath_kv_hit_tokens_total": ("counter", "prompt tokens served from KV", ("tier",)),
    "dualpath_cost_total": ("counter", "billed amount", ("service_tier", "window")),
    "dualpath_read_path_total": ("counter", "plans by stored-KV read path", ("path",)),
    "dualpath_snic_queue_bytes": ("gauge", "storage NIC queue", ("node", "direction")),
    "dualpath_snic_bytes_total": ("counter", "storage NIC bytes moved", ("node", "direction")),
    "dualpath_spec_drafted_tokens_total": (
        "counter",
        "speculative decoding: tokens drafted for served requests",
        ("tenant",),
    ),
    "dualpath_spec_accepted_tokens_total": (
        "counter",
        "speculative decoding: drafted tokens the target model accepted",
        ("tenant",),
    ),
    "dualpath_spec_verify_steps_total": (
        "counter",
        "speculative decoding: sequence-steps that verified a draft (mean accepted length "
        "= 1 + accepted / steps)",
        ("tenant",),
    ),
    "dualpath_engine_running": ("gauge", "running requests", ("replica", "role", "node")),
    "dualpath_engine_waiting": ("gauge", "waiting requests", ("replica", "role", "node")),
    "dualpath_engine_free_blocks": ("gauge", "free KV blocks", ("replica", "role", "node")),
}


class Metrics:
    def __init__(self, backend: Literal["ray", "memory"] = "ray"):
        self.backend = backend
        self._ray: dict[str, Any] = {}
        self.values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = defaultdict(list)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        if value:
            self._record(name, "counter", value, labels)

    def set(self, name: str, value: float, **labels: str) -> None:
        self._record(name, "gauge", value, labels)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._record(name, "histogram", value, labels)

    def value(self, name: str, **labels: str) -> float:
        """A counter's total or a gauge's value (memory backend)."""
        return self.values[(name, tuple(sorted(labels.items())))]

    def _record(self, name: str, kind: Kind, value: float, labels: dict[str, str]) -> None:
        spec_kind, description, keys = SPECS[name]
        if spec_kind != kind or set(labels) != set(keys):
            raise ValueError(f"{name} is a {spec_kind} with labels {keys}, got {kind} {labels}")
        labels = {k: str(v) for k, v in labels.items()}
        if self.backend == "memory":
            key = (name, tuple(sorted(labels.items())))
            if kind == "histogram":
                self.samples[key].append(value)
            elif kind == "counter":
                self.values[key] += value
            else:
                self.values[key] = value
            return
        metric = self._ray.get(name)
        if metric is None:
            metric = self._ray[name] = _ray_metric(name, kind, description, keys)
        if kind == "counter":
            metric.inc(value, tags=labels)
        elif kind == "gauge":
            metric.set(value, tags=labels)
        else:
            metric.observe(value, tags=labels)


def _ray_metric(name: str, kind: Kind, description: str, keys: tuple[str, ...]) -> Any:
    from ray.util.metrics import Counter, Gauge, Histogram

    if kind == "counter":
        return Counter(name, description, tag_keys=keys)
    if kind == "gauge":
        return Gauge(name, description, tag_keys=keys)
    return Histogram(name, description, boundaries=LATENCY_BOUNDS, tag_keys=keys)
