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
            anywhere, the one holding the fewest tokens queues the import. Before all
            this (without `dram_pulls`), a decode node whose DRAM or write buffer holds
            the prompt's newest blocks (their NVMe write lags) takes it while it stays
            within Z of the least loaded other node plus the tokens it saves from
            recompute.
  read side by when the read would finish on each side: the bytes ahead of it on that
            node's SNIC (queued, in flight, and planned but not yet started), plus its
            own bytes (blocks already in that node's DRAM cost none), at that SNIC's rate;
            the decode side adds forwarding the KV to the PE (`forward_bytes_per_s`).
            Within `tie_fraction` of each other the sides alternate. Blocks only one side
            can read (in one node's DRAM or write buffer) stay on that side.
            `dualpath_split` splits one request's blocks where both sides finish first
            (the paper's future work); `single_path` always reads on the PE side (the
            classic PD baseline); `round_robin` ignores load (the paper's ablation).
  pulls     (`dram_pulls`) a block in another live node's DRAM is pulled from there
            through the object store (the compute network, `forward_bytes_per_s`) when
            that beats the side's own SNIC queue — always for a block not on NVMe yet.
            `Plan.pulls` names the runs and their source nodes.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from deployments.protocol import Plan, PlanRequest, ReadPath
from deployments.scheduler.view import ClusterView, EngineState
from kvstore.index import IndexEntry

PolicyName = Literal["dualpath", "dualpath_split", "single_path", "round_robin"]


class NoEngineAvailable(RuntimeError):
    """No live replica of a needed role: the caller answers 503 and retries later."""


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    name: PolicyName = "dualpath"
    alpha_s: float = 3.0  # a node's read queue is short if it drains within this
    beta_s: float = 5.0  # a PE with more queued compute than this is overloaded
    z_factor: float = 1.05  # the DE high-token threshold over the group mean
    prefill_tokens_per_s: float = 1000.0  # a PE's rate until it reports a measured one
    snic_bytes_per_s: float = 1e9  # an uncapped SNIC's rate until one is measured
    forward_bytes_per_s: float = 25e9  # DE -> PE forwarding of KV the decode side read
    tie_fraction: float = 0.1  # read sides this close in finish time count as equal
    dram_pulls: bool = True  # blocks in another node's DRAM may be pulled from there


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
    round_robin = cfg.name == "round_robin"
    prefill = pes[view.rr_counter % len(pes)] if round_robin else _pick_prefill(pes, view, cfg)
    need_tokens = request.num_prompt_tokens + request.max_tokens
    block_size = prefill.report.block_size
    max_hits = (request.num_prompt_tokens - 1) // block_size
    if round_robin:
        decode = des[view.rr_counter % len(des)]
    else:
        holders = _holders(request.block_keys[:max_hits], prefill, des, view, cfg)
        decode = _pick_decode(des, need_tokens, cfg, holders)
    sides = _ReadSides.of(request.block_keys[:max_hits], prefill, decode, view, now, cfg)
    num_hits, num_de_blocks = sides.num_hits, sides.choose(view, cfg)
    path = (
        ReadPath.NONE
        if num_hits == 0
        else ReadPath.PE
        if num_de_blocks == 0
        else ReadPath.DE
        if num_de_blocks == num_hits
        else ReadPath.SPLIT
    )
    return Plan(
        request_id=request.request_id,
        prefill_replica=prefill.report.replica_id,
        decode_replica=decode.report.replica_id,
        prefill_node=prefill.node_id,
        decode_node=decode.node_id,
        read_path=path,
        num_hit_blocks=num_hits,
        num_de_blocks=num_de_blocks,
        pulls=sides.pulls(num_de_blocks),
    )


def plan_and_note(
    request: PlanRequest, view: ClusterView, now: float, config: PolicyConfig | None = None
) -> Plan:
    """plan(), then charge the chosen engines and SNICs in the view with this request's work
    until their reports count it (see ClusterView)."""
    result = plan(request, view, now, config)
    rid = request.request_id
    block_size = view.engines[result.prefill_replica].report.block_size
    miss_tokens = request.num_prompt_tokens - result.num_hit_blocks * block_size
    view.note_planned(result.prefill_replica, rid, miss_tokens, now)
    decode_tokens = request.num_prompt_tokens + request.max_tokens
    view.note_planned(result.decode_replica, rid, decode_tokens, now)
    block_bytes = _block_bytes(view.engines[result.prefill_replica])
    for node, blocks in snic_reads(result, request.block_keys, view):
        view.note_read(node, rid, blocks * block_bytes, now)
    view.rr_counter += 1
    return result


def snic_reads(result: Plan, keys: tuple[bytes, ...], view: ClusterView) -> list[tuple[str, int]]:
    """(node, blocks) each read side of a plan reads through its own SNIC: its part of the
    hit blocks less those in its DRAM and those pulled from another node's DRAM."""
    pulled = {i for start, end, _ in result.pulls for i in range(start, end)}
    sides = (
        (result.decode_node, range(result.num_de_blocks)),
        (result.prefill_node, range(result.num_de_blocks, result.num_hit_blocks)),
    )
    reads = []
    for node, part in sides:
        own = tuple(keys[i] for i in part if i not in pulled)
        reads.append((node, _snic_blocks(view, node, own)))
    return reads


def replace_decode(
    request_id: str,
    lost_replica: str,
    num_tokens: int,
    view: ClusterView,
    now: float,
    config: PolicyConfig | None = None,
) -> EngineState:
    """A live decode engine for a request whose DE was lost mid-decode (on any node: the lost
    one's node may be gone), charged with the request's `num_tokens` of KV. The lost replica
    leaves the view: a restarted replica is a new one and reports itself.

    Raises:
        NoEngineAvailable: no live decode engine.
    """
    cfg = config or PolicyConfig()
    view.remove(lost_replica)
    view.forget_request(request_id)
    des = sorted(view.live("decode", now), key=lambda e: e.report.replica_id)
    if not des:
        raise NoEngineAvailable("no decode engine is ready")
    decode = _pick_decode(des, num_tokens, cfg)
    view.note_planned(decode.report.replica_id, request_id, num_tokens, now)
    return decode


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


def _holders(
    keys: tuple[bytes, ...],
    prefill: EngineState,
    des: list[EngineState],
    view: ClusterView,
    cfg: PolicyConfig,
) -> dict[str, int]:
    """Decode nodes that would lengthen the hit, with the tokens they save: their DRAM (or
    write buffer: blocks whose NVMe write still lags) holds blocks past what the PE node
    alone can read. With `dram_pulls` every node reaches them: locality saves nothing."""
    if cfg.name == "single_path" or cfg.dram_pulls or not keys:
        return {}
    pe = prefill.node_id
    alone = view.index.longest_prefix(keys, None, {pe})
    if alone == len(keys):
        return {}
    nodes = {e.node_id for e in des} - {pe}
    reach = {node: view.index.longest_prefix(keys, None, {pe, node}) for node in nodes}
    block_size = prefill.report.block_size
    return {node: (n - alone) * block_size for node, n in reach.items() if n > alone}


def _pick_decode(
    des: list[EngineState],
    need_tokens: int,
    cfg: PolicyConfig,
    holders: dict[str, int] | None = None,
) -> EngineState:
    groups: dict[str, list[EngineState]] = defaultdict(list)
    for e in des:
        groups[e.node_id].append(e)
    # NOTE: a node holding the request's newest blocks (write lag) serves it while it would
    # hold at most Z x what the least loaded other node would, plus the tokens it saves
    # from recompute: locality wins over balance only by what it is worth.
    load = {node: sum(e.context_tokens for e in group) for node, group in groups.items()}
    for node, saved in sorted((holders or {}).items(), key=lambda h: (-h[1], load[h[0]])):
        others = [t for n, t in load.items() if n != node]
        limit = cfg.z_factor * (min(others, default=0) + need_tokens) + saved
        fits = [e for e in groups[node] if e.free_blocks * e.report.block_size >= need_tokens]
        if fits and (not others or load[node] + need_tokens <= limit):
            return min(fits, key=lambda e: (e.running, e.context_tokens))
    for _, group in sorted(groups.items(), key=lambda g: sum(e.context_tokens for e in g[1])):
        fits = [e for e in group if e.free_blocks * e.report.block_size >= need_tokens]
        if not fits:
            continue
        z = cfg.z_factor * (need_tokens + sum(e.context_tokens for e in group)) / len(group)
        low = [e for e in fits if e.context_tokens + need_tokens <= z]
        if low:
            return min(low, key=lambda e: (e.running, e.context_tokens))
        return min(fits, key=lambda e: e.context_tokens)
    # NOTE: no engine has room now: the import queues wherever it lands. The engine holding
    # the fewest tokens frees room soonest; "most free blocks" kept choosing the engine whose
    # report lagged, and collected the overflow (the simulator: -14 % / -6 % JCT).
    return min(des, key=lambda e: (e.context_tokens, e.running))


@dataclass(frozen=True, slots=True)
class _ReadSides:
    """The hit blocks and what reading a prefix of them on the decode side costs.

    The decode side reads blocks [0, s), the prefill side [s, num_hits); `s` may range over
    [lo, hi]: blocks only the PE node can read (its DRAM or write buffer) force s below them,
    blocks only the DE node can read force s past them. Bytes count what each side reads
    through its SNIC (a block in that node's DRAM costs none).
    """

    num_hits: int
    lo: int
    hi: int
    pe_after: tuple[int, ...]  # [s]: the PE side's SNIC bytes of blocks [s, num_hits)
    de_before: tuple[int, ...]  # [s]: the decode side's SNIC bytes of blocks [0, s)
    pe_queue_s: float = 0.0
    de_queue_s: float = 0.0
    pe_rate: float = 1.0
    de_rate: float = 1.0
    block_bytes: int = 0
    # per block, the node each side would pull it from ("" = its own DRAM or SNIC), and
    # the pulled bytes as the SNIC bytes above: [s] of blocks [s, n) / [0, s)
    pe_src: tuple[str, ...] = ()
    de_src: tuple[str, ...] = ()
    pe_pull_after: tuple[int, ...] = (0,)
    de_pull_before: tuple[int, ...] = (0,)

    @classmethod
    def of(
        cls,
        keys: tuple[bytes, ...] | list[bytes],
        prefill: EngineState,
        decode: EngineState,
        view: ClusterView,
        now: float,
        cfg: PolicyConfig,
    ) -> _ReadSides:
        pe, de = prefill.node_id, decode.node_id
        both = cfg.name != "single_path" and pe != de
        live = set(view.nodes) if cfg.dram_pulls else set()
        entries = view.index.locate(keys, ({pe, de} if both else {pe}) | live, now)
        if not entries:
            return cls(0, 0, 0, (), ())
        block = _block_bytes(prefill)
        pe_node, de_node = view.node(pe), view.node(de)
        pe_queue_s = pe_node.read_queue_s(cfg.snic_bytes_per_s) if pe_node else 0.0
        de_queue_s = de_node.read_queue_s(cfg.snic_bytes_per_s) if de_node else 0.0
        pe_rate = pe_node.rate(cfg.snic_bytes_per_s) if pe_node else cfg.snic_bytes_per_s
        de_rate = de_node.rate(cfg.snic_bytes_per_s) if de_node else cfg.snic_bytes_per_s
        pull_s = block / cfg.forward_bytes_per_s
        pe_pays = pull_s < pe_queue_s + block / pe_rate
        de_pays = pull_s < de_queue_s + block / de_rate
        pe_src = [_pull_source(e, pe, live, pe_pays) for e in entries]
        de_src = [_pull_source(e, de, live, de_pays) for e in entries]
        pe_ok = [e.on_nvme or pe in e.dram_nodes or bool(pe_src[i]) for i, e in enumerate(entries)]
        de_ok = [
            both and (e.on_nvme or de in e.dram_nodes or bool(de_src[i]))
            for i, e in enumerate(entries)
        ]
        de_run = next((i for i, ok in enumerate(de_ok) if not ok), len(entries))
        # past the decode side's readable run, every block must be readable on the PE side
        pe_run = next((i for i, ok in enumerate(pe_ok[de_run:]) if not ok), len(entries))
        num_hits = min(len(entries), de_run + pe_run)
        lo = max((i + 1 for i in range(num_hits) if not pe_ok[i]), default=0)
        hi = min(de_run, num_hits)
        hits = range(num_hits)
        pe_bytes = [0 if pe in entries[i].dram_nodes or pe_src[i] else block for i in hits]
        de_bytes = [0 if de in entries[i].dram_nodes or de_src[i] else block for i in hits]
        pe_pulls = [block if pe_src[i] else 0 for i in hits]
        de_pulls = [block if de_src[i] else 0 for i in hits]
        return cls(
            num_hits,
            lo,
            hi,
            tuple(itertools.accumulate(reversed(pe_bytes), initial=0))[::-1],
            tuple(itertools.accumulate(de_bytes, initial=0)),
            pe_queue_s,
            de_queue_s,
            pe_rate,
            de_rate,
            block,
            tuple(pe_src[:num_hits]),
            tuple(de_src[:num_hits]),
            tuple(itertools.accumulate(reversed(pe_pulls), initial=0))[::-1],
            tuple(itertools.accumulate(de_pulls, initial=0)),
        )

    def pulls(self, s: int) -> tuple[tuple[int, int, str], ...]:
        """Runs `(start, end, node)` of hit blocks pulled from another node's DRAM when the
        decode side reads blocks [0, s)."""
        sources = [*self.de_src[:s], *self.pe_src[s : self.num_hits]]
        runs: list[tuple[int, int, str]] = []
        for i, src in enumerate(sources):
            if not src:
                continue
            if runs and runs[-1][1] == i and runs[-1][2] == src and i != s:
                runs[-1] = (runs[-1][0], i + 1, src)
            else:
                runs.append((i, i + 1, src))
        return tuple(runs)

    def finish_s(self, s: int, cfg: PolicyConfig) -> tuple[float, float]:
        """When the PE side and the decode side (its KV forwarded) would have read their
        parts if the decode side reads blocks [0, s)."""
        pe_bytes, de_bytes = self.pe_after[s], self.de_before[s]
        pe = self.pe_queue_s + pe_bytes / self.pe_rate if pe_bytes else 0.0  # DRAM: no wait
        de = self.de_queue_s + de_bytes / self.de_rate if de_bytes else 0.0
        # pulls from other nodes' DRAM run beside the SNIC reads, at the forwarding rate
        pe = max(pe, self.pe_pull_after[s] / cfg.forward_bytes_per_s)
        de = max(de, self.de_pull_before[s] / cfg.forward_bytes_per_s)
        return pe, de + s * self.block_bytes / cfg.forward_bytes_per_s

    def choose(self, view: ClusterView, cfg: PolicyConfig) -> int:
        """How many leading hit blocks the decode side reads."""
        if self.num_hits == 0 or self.lo == self.hi:
            return self.lo
        if cfg.name == "round_robin":
            return self.hi if view.rr_counter % 2 else self.lo
        if cfg.name == "dualpath_split":
            return min(range(self.lo, self.hi + 1), key=lambda s: max(self.finish_s(s, cfg)))
        on_pe, on_de = max(self.finish_s(self.lo, cfg)), max(self.finish_s(self.hi, cfg))
        if abs(on_pe - on_de) <= cfg.tie_fraction * max(on_pe, on_de):
            view.tie_counter += 1
            return self.lo if view.tie_counter % 2 else self.hi
        return self.hi if on_de < on_pe else self.lo


def _pull_source(entry: IndexEntry, side: str, live: set[str], pays: bool) -> str:
    """The node `side` pulls this block from ("" = none): another live node's DRAM, when the
    block is not in the side's own DRAM and either not on NVMe or the pull `pays`."""
    if side in entry.dram_nodes or not (entry.dram_nodes & live):
        return ""
    if entry.on_nvme and not pays:
        return ""
    return min(entry.dram_nodes & live)


def _snic_blocks(view: ClusterView, node: str, keys: tuple[bytes, ...]) -> int:
    """Blocks of `keys` that `node` reads through its SNIC (not in its DRAM)."""
    return sum(1 for e in view.index.locate(keys) if node not in e.dram_nodes)


def _block_bytes(engine: EngineState) -> int:
    return max(1, engine.report.kv_bytes_per_token) * engine.report.block_size
