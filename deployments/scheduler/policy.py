"""plan(request, view, now, config) -> Plan: the prefill engine, the decode engine, and which
side reads the request's stored KV. Pure (no Ray, torch, I/O or clock), so the simulator
runs exactly this code.

The DualPath paper's algorithm (§6.1), applied per request:
  hits      the longest stored prefix of the prompt's block keys (cluster KV index), less
            one block if needed so at least one prompt token is computed.
  PE        α = a node's SNIC read queue drains within `alpha_s` (3 s); β = the engine's
            unfinished prefill tokens take at most `beta_s` (5 s) at its measured rate.
            Overloaded engines (> β) are skipped; among the rest, engines whose node has a
            short read queue come first; the fewest unfinished tokens wins. If every PE is
            overloaded the least loaded one takes it (it queues; admission holds the rest).
  DE        the node group with the fewest tokens held; inside it, Z = 1.05 × mean tokens
            per engine (counting this request): engines that stay ≤ Z after taking it are
            preferred, fewest running requests first; otherwise the fewest tokens. Only
            engines with free blocks for prompt + max_tokens qualify; when none has room
            anywhere, the one with the most free blocks queues the import.
  read side the node with the shorter read queue (in seconds at its SNIC's rate), PE on a
            tie. `dualpath_split` splits one request's blocks so both sides finish
            together (the paper's future work); `single_path` always reads on the PE side
            (the classic PD baseline); `round_robin` ignores load (the paper's ablation).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from deployments.protocol import Plan, PlanRequest, ReadPath
from deployments.scheduler.view import ClusterView, EngineState

PolicyName = Literal["dualpath", "dualpath_split", "single_path", "round_robin"]


class NoEngineAvailable(RuntimeError):
    """No live replica of a needed role: the caller answers 503 and retries later."""


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    policy: PolicyName = "dualpath"
    alpha_s: float = 3.0  # a node's read queue is short if it drains within this
    beta_s: float = 5.0  # a PE with more queued compute than this is overloaded
    z_factor: float = 1.05  # the DE high-token threshold over the group mean
    prefill_tokens_per_s: float = 1000.0  # a PE's rate until it reports a measured one
    snic_bytes_per_s: float = 1e9  # an uncapped SNIC's rate until one is measured


def plan(
    request: PlanRequest, view: ClusterView, now: float, config: PolicyConfig | None = None
) -> Plan:
    cfg = config or PolicyConfig()
    pes = sorted(view.live("prefill", now), key=lambda e: e.report.replica_id)
    if not pes:
        raise NoEngineAvailable("no prefill engine is ready")
    des = sorted(view.live("decode", now), key=lambda e: e.report.replica_id)
    if not des:
        raise NoEngineAvailable("no decode engine is ready")
    round_robin = cfg.policy == "round_robin"
    prefill = pes[view.rr_counter % len(pes)] if round_robin else _pick_prefill(pes, view, cfg)
    need_tokens = request.num_prompt_tokens + request.max_tokens
    decode = des[view.rr_counter % len(des)] if round_robin else _pick_decode(des, need_tokens, cfg)

    block_size = prefill.report.block_size
    max_hits = (request.num_prompt_tokens - 1) // block_size
    readers = {prefill.node_id, decode.node_id}
    num_hits = min(view.index.longest_prefix(request.block_keys, now, readers), max_hits)
    de_blocks = _decode_side_blocks(num_hits, prefill, decode, view, cfg) if num_hits else 0
    path: ReadPath = (
        "none"
        if num_hits == 0
        else "pe"
        if de_blocks == 0
        else "de"
        if de_blocks == num_hits
        else "split"
    )
    return Plan(
        request_id=request.request_id,
        prefill_replica=prefill.report.replica_id,
        decode_replica=decode.report.replica_id,
        prefill_node=prefill.node_id,
        decode_node=decode.node_id,
        read_path=path,
        num_hit_blocks=num_hits,
        de_read_blocks=de_blocks,
    )


def plan_and_note(
    request: PlanRequest, view: ClusterView, now: float, config: PolicyConfig | None = None
) -> Plan:
    """plan(), then charge the chosen engines and SNICs in the view until their next report."""
    result = plan(request, view, now, config)
    block_size = view.engines[result.prefill_replica].report.block_size
    miss_tokens = request.num_prompt_tokens - result.num_hit_blocks * block_size
    view.note_planned(result.prefill_replica, miss_tokens)
    view.note_planned(result.decode_replica, request.num_prompt_tokens + request.max_tokens)
    block_bytes = _block_bytes(view.engines[result.prefill_replica])
    view.note_read(result.prefill_node, result.pe_read_blocks * block_bytes)
    view.note_read(result.decode_node, result.de_read_blocks * block_bytes)
    view.rr_counter += 1
    return result


def _pick_prefill(pes: list[EngineState], view: ClusterView, cfg: PolicyConfig) -> EngineState:
    short: list[EngineState] = []
    long: list[EngineState] = []
    for e in pes:
        rate = e.report.prefill_tokens_per_s or cfg.prefill_tokens_per_s
        if e.queued_tokens > rate * cfg.beta_s:
            continue  # overloaded
        node = view.node(e.node_id)
        queue_s = node.read_queue_s(cfg.snic_bytes_per_s) if node else 0.0
        (short if queue_s <= cfg.alpha_s else long).append(e)
    candidates = short or long or pes
    return min(candidates, key=lambda e: e.queued_tokens)


def _pick_decode(des: list[EngineState], need_tokens: int, cfg: PolicyConfig) -> EngineState:
    groups: dict[str, list[EngineState]] = defaultdict(list)
    for e in des:
        groups[e.node_id].append(e)
    for _, group in sorted(groups.items(), key=lambda g: sum(e.context_tokens for e in g[1])):
        fits = [e for e in group if e.free_blocks * e.report.block_size >= need_tokens]
        if not fits:
            continue
        z = cfg.z_factor * (need_tokens + sum(e.context_tokens for e in group)) / len(group)
        low = [e for e in fits if e.context_tokens + need_tokens <= z]
        if low:
            return min(low, key=lambda e: (e.running, e.context_tokens))
        return min(fits, key=lambda e: e.context_tokens)
    return max(des, key=lambda e: e.free_blocks)


def _decode_side_blocks(
    num_hits: int,
    prefill: EngineState,
    decode: EngineState,
    view: ClusterView,
    cfg: PolicyConfig,
) -> int:
    """How many of the hit blocks (a prefix) the decode side reads; the PE reads the rest."""
    if cfg.policy == "single_path" or prefill.node_id == decode.node_id:
        return 0
    if cfg.policy == "round_robin":
        return num_hits if view.rr_counter % 2 else 0
    pe_node, de_node = view.node(prefill.node_id), view.node(decode.node_id)
    if pe_node is None or de_node is None:
        return 0
    q_pe = pe_node.read_queue_s(cfg.snic_bytes_per_s)
    q_de = de_node.read_queue_s(cfg.snic_bytes_per_s)
    if cfg.policy == "dualpath":
        return num_hits if q_de < q_pe else 0
    # dualpath_split: x blocks on the DE side so that both sides finish together:
    #   q_pe + (h - x) * b / r_pe == q_de + x * b / r_de
    block_bytes = _block_bytes(prefill)
    t_pe = block_bytes / pe_node.rate(cfg.snic_bytes_per_s)
    t_de = block_bytes / de_node.rate(cfg.snic_bytes_per_s)
    x = (q_pe - q_de + num_hits * t_pe) / (t_pe + t_de)
    return max(0, min(num_hits, round(x)))


def _block_bytes(engine: EngineState) -> int:
    return max(1, engine.report.kv_bytes_per_token) * engine.report.block_size
