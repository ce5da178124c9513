"""SimCluster: nodes, engines and storage on an event loop, scheduled by the live policy.

Every turn goes the way app/choice_flow.py sends a request:
  1. plan      `deployments.scheduler.policy.plan_and_note` on a real ClusterView, looked up
               on the module at call time (so the simulator runs whatever the live policy
               is, patched or not), fed with LoadReports / NodeReports the simulated
               engines and nodes publish every `report_interval_s`, index events included.
               The view keeps what it planned until a report names the request: the
               engine's `arrived_ids` (it took the request in), the node's `started_ids`
               (its SNIC took the reads in).
  2. read      the hit blocks through the SNICs the plan names: the DE node reads the first
               `num_de_blocks`, the PE node the rest; the prefill job waits for both.
  3. prefill   on the chosen PE; hit KV moves into it over its CNIC (path B: from the DE
               node's buffer, over both CNICs); the first token ends TTFT.
  4. decode    the PE sends the KV the DE lacks (path A: all, B: the miss part), the DE
               buffer goes into HBM, the DE decodes; it persists every new full block
               through its node's SNIC (WRITE class); the index learns of a block when its
               write completes, at the node's next report.
On a CPU device (the one-machine emulation) the KV moves are host copies instead of CNIC
transfers, and all engines share one Host's cores.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from deployments.protocol import Plan, PlanRequest
from deployments.scheduler import policy as live_policy
from deployments.scheduler.view import ClusterView
from engine.cost_model import PrefillCostModel
from kvstore.index import IndexEvent
from ops.sim.config import Scenario
from ops.sim.engines import DecodeEngine, DecodeTask, EngineSpec, PrefillEngine, PrefillTask
from ops.sim.events import EventLoop, Host, Link
from ops.sim.metrics import NodeTraffic, RunResult, TurnRecord
from ops.sim.perf import PerfModel, engine_weight_bytes
from ops.sim.presets import resolve_device, resolve_model
from ops.sim.storage import (
    WRITE,
    BlockKeys,
    BlockWrites,
    CompactIndex,
    SimNode,
    SimSNIC,
    block_key,
)
from ops.sim.traces import SimAgent


class SimCluster:
    def __init__(self, scenario: Scenario, policy: str, oracle: bool = False):
        self.scenario = scenario
        c = scenario.cluster
        self.loop = EventLoop()
        self.model = resolve_model(scenario.model)
        self.device = resolve_device(scenario.device)
        self.block_size = self.model.block_size
        self.block_bytes = self.model.kv_bytes_per_token * self.block_size
        self.copy_rate = self.device.copy_bytes_per_s
        self.host = Host(self.loop, c.host_cores, c.background_threads) if c.host_cores else None
        self.plumb_rate = c.kv_plumbing_bytes_per_s or self.copy_rate
        p = scenario.policy
        forward = p.forward_bytes_per_s or (None if self.copy_rate else c.cnic_bytes_per_s)
        self.policy_config = live_policy.PolicyConfig(
            name=policy,
            alpha_s=p.alpha_s,
            beta_s=p.beta_s,
            z_factor=p.z_factor,
            **({"prefill_tokens_per_s": p.prefill_tokens_per_s} if p.prefill_tokens_per_s else {}),
            **({"forward_bytes_per_s": forward} if forward else {}),
        )
        self.view = ClusterView(c.stale_after_s, c.planned_ttl_s)
        if scenario.index == "compact":
            self.view.index = CompactIndex()  # type: ignore[assignment]
        cap = None if oracle else c.snic_bytes_per_s
        self.nodes: dict[str, SimNode] = {}
        self.prefill: dict[str, PrefillEngine] = {}
        self.decode: dict[str, DecodeEngine] = {}
        self.cnic: dict[str, Link] = {}
        for role, count in (("prefill", c.prefill_nodes), ("decode", c.decode_nodes)):
            ep = {"role": count * c.gpus_per_node, "node": c.gpus_per_node, "none": 1}
            ep_size = min(ep[c.expert_parallel], c.max_ep_gpus or ep[c.expert_parallel])
            perf = PerfModel(self.model, self.device, engine_weight_bytes(self.model, ep_size))
            for i in range(count):
                node_id = f"{role[0]}{i}"
                snic = SimSNIC(
                    self.loop, node_id, cap, c.snic_uncapped_bytes_per_s, c.min_write_share
                )
                self.nodes[node_id] = SimNode(node_id, role, snic)
                for g in range(c.gpus_per_node):
                    self._add_engine(role, f"{node_id}/g{g}", node_id, perf)
        self.records: list[TurnRecord] = []
        self.bytes_hit_needed = 0
        self.writes = BlockWrites()
        self._agents_left = 0
        self._barrier: list[tuple[SimAgent, int]] = []
        self._barrier_size = 0
        self.timed_from = 0.0
        self.num_arrivals = 0  # requests reaching a PE or a DE
        self.num_forgotten = 0  # ... whose planned work had left the view already

    def _add_engine(self, role: str, replica_id: str, node_id: str, perf: PerfModel) -> None:
        c = self.scenario.cluster
        if role == "prefill":
            tokens = c.pe_kv_tokens or 1 << 40  # layer-wise prefill: one layer's KV at a time
        else:
            tokens = c.de_kv_tokens or perf.kv_tokens_capacity()
        blocks = tokens // self.block_size
        spec = EngineSpec(self.loop, replica_id, node_id, perf, blocks, self.host, c.max_num_seqs)
        if role == "prefill":
            # the engine's own defaults on this CPU (as the app runs), a profiled prior on
            # GPUs; either way refitted online to the steps' durations
            cost = PrefillCostModel() if self.copy_rate else PrefillCostModel(*perf.cost_prior())
            self.prefill[replica_id] = PrefillEngine(
                spec, c.max_batched_tokens, c.prefill_quota_s, cost
            )
        else:
            self.decode[replica_id] = DecodeEngine(spec)
        self.cnic[replica_id] = Link(replica_id, c.cnic_bytes_per_s)

    # ------------------------------------------------------------------ reports
    def _report(self, force: bool = False) -> None:
        now = self.loop.now
        for engine in (*self.prefill.values(), *self.decode.values()):
            if engine.dirty or force:
                self.view.update(engine.load_report(now))
                engine.dirty = False
        for node in self.nodes.values():
            if node.dirty or node.events or force:
                report = node.report(now, self.model.kv_bytes_per_token, force and now == 0.0)
                self.view.update_node(report, now)

    def _tick(self) -> None:
        self._report()
        self.loop.after(self.scenario.cluster.report_interval_s, self._tick)

    def _keepalive(self) -> None:
        self._report(force=True)
        self.loop.after(self.scenario.cluster.stale_after_s / 3, self._keepalive)

    # ------------------------------------------------------------------ storage
    def _prestore(self, agent: SimAgent) -> None:
        """A window that starts mid-trajectory: its earlier context is stored already."""
        if agent.first_turn == 0:
            return
        prev = agent.first_turn - 1
        blocks = (agent.prompt_len(prev) + agent.gens[prev] - 1) // self.block_size
        self.writes.mark_stored(agent.agent_id, blocks)
        index = self.view.index
        if isinstance(index, CompactIndex):
            index.mark_stored(agent.agent_id, blocks)
        else:
            index.apply(
                [IndexEvent(block_key(agent.agent_id, b), "nvme", True) for b in range(blocks)]
            )

    def _persist(self, agent_id: int, node: SimNode, first: int, end: int) -> None:
        """Write blocks [first, end) of an agent that are not stored or being written."""
        new = self.writes.begin(agent_id, first, end)
        if not new:
            return

        def done() -> None:
            self.writes.complete(agent_id, new)
            node.events.extend(IndexEvent(block_key(agent_id, b), "nvme", True) for b in new)

        nbytes = len(new) * self.block_bytes
        self._cpu(nbytes, lambda: node.snic.submit(WRITE, nbytes, done))
        node.dirty = True

    def _cpu(self, nbytes: int, then: Callable[[], None]) -> None:
        """Host CPU work of moving `nbytes` of KV outside the engines (CPU devices only)."""
        if not self.plumb_rate or nbytes <= 0:
            then()
        elif self.host is not None:
            self.host.run_job(nbytes / self.plumb_rate, then)
        else:
            self.loop.after(nbytes / self.plumb_rate, then)

    # ------------------------------------------------------------------ a turn
    def _arrive(self, agent: SimAgent, turn: int) -> None:
        warm = self.scenario.trace.warmup_turns
        record = TurnRecord(
            agent.agent_id,
            turn - agent.first_turn,
            self.loop.now,
            agent.prompt_len(turn),
            agent.gens[turn],
            request_id=f"{agent.agent_id}-{turn}",
            timed=turn - agent.first_turn >= warm,
            cold=turn == 0,
        )
        self.records.append(record)
        self.loop.after(self.scenario.cluster.request_overhead_s, self._plan, agent, turn, record)

    def _plan(self, agent: SimAgent, turn: int, record: TurnRecord) -> None:
        now = self.loop.now
        keys = BlockKeys(agent.agent_id, record.prompt_tokens // self.block_size)
        request = PlanRequest(
            record.request_id,
            record.prompt_tokens,
            record.gen_tokens,
            keys if self.scenario.index == "compact" else tuple(keys),  # type: ignore[arg-type]
        )
        plan = live_policy.plan_and_note(request, self.view, now, self.policy_config)
        record.planned_s = now
        record.hit_blocks, record.num_de_blocks = plan.num_hit_blocks, plan.num_de_blocks
        record.read_path = plan.read_path
        record.prefill_replica, record.decode_replica = plan.prefill_replica, plan.decode_replica
        pe, de = self.prefill[plan.prefill_replica], self.decode[plan.decode_replica]
        pe.dirty = de.dirty = True  # a report at the next tick, as the live engines send
        if self.scenario.cluster.forgetful_view:
            # NOTE: the view before the fix dropped what it planned onto an engine at the
            # engine's next report; naming the request there as arrived does just that
            pe.arrived.note(request.request_id, now)
            de.arrived.note(request.request_id, now)
        self.bytes_hit_needed += plan.num_hit_blocks * self.block_bytes
        reads = [
            (self.nodes[plan.prefill_node], plan.pe_read_blocks),
            (self.nodes[plan.decode_node], plan.num_de_blocks),
        ]
        reads = [(node, blocks) for node, blocks in reads if blocks]
        left = [len(reads)]

        def read_done() -> None:
            left[0] -= 1
            if left[0] == 0:
                record.read_done_s = self.loop.now
                self._to_prefill(agent, turn, record, plan)

        if not reads:
            left[0] = 1
            read_done()
        for node, blocks in reads:
            nbytes = blocks * self.block_bytes
            node.read(request.request_id, nbytes, lambda n=nbytes: self._cpu(n, read_done))

    def _to_prefill(self, agent: SimAgent, turn: int, record: TurnRecord, plan: Plan) -> None:
        pe = self.prefill[plan.prefill_replica]
        hit_tokens = plan.num_hit_blocks * self.block_size
        hit_bytes = hit_tokens * self.model.kv_bytes_per_token
        import_s = load_s = 0.0
        if self.copy_rate:  # CPU: the PE fetches the hit blocks, then copies them in
            import_s = hit_bytes / self.copy_rate
        else:  # GPU: layer by layer over the PE's CNIC (path B: from the DE node's buffer)
            pe_link, de_link = self.cnic[plan.prefill_replica], self.cnic[plan.decode_replica]
            load_s = hit_bytes / pe_link.bytes_per_s
            pe_link.bytes_total += hit_bytes
            de_link.bytes_total += plan.num_de_blocks * self.block_bytes

        def first_token(task: PrefillTask) -> None:
            self._first_token(agent, turn, record, plan)

        task = PrefillTask(record, record.prompt_tokens, hit_tokens, import_s, load_s, first_token)

        def submit() -> None:
            self._count_arrival(plan.prefill_replica, record.request_id)
            pe.submit(task)

        self._cpu(hit_bytes if self.copy_rate else 0, submit)

    def _first_token(self, agent: SimAgent, turn: int, record: TurnRecord, plan: Plan) -> None:
        now = self.loop.now
        record.first_token_s = now
        de = self.decode[plan.decode_replica]
        if record.gen_tokens <= 1:  # done at the PE: the DE never sees it
            # NOTE: so no report will name it; drop its DE plan now rather than at the TTL
            self.view.forget_request(record.request_id)
            self._finish(agent, turn, record, self.nodes[plan.decode_node])
            return
        kvb = self.model.kv_bytes_per_token
        send_bytes = (record.prompt_tokens - plan.num_de_blocks * self.block_size) * kvb
        prompt_bytes = record.prompt_tokens * kvb
        arrive = now
        if not self.copy_rate:  # PE HBM -> DE buffer over both CNICs, then DE buffer -> HBM
            pe_link, de_link = self.cnic[plan.prefill_replica], self.cnic[plan.decode_replica]
            arrive += send_bytes / min(pe_link.bytes_per_s, de_link.bytes_per_s)
            arrive += prompt_bytes / de_link.bytes_per_s
            pe_link.bytes_total += send_bytes
            de_link.bytes_total += send_bytes + prompt_bytes
        node = self.nodes[plan.decode_node]

        def decode_done(task: DecodeTask) -> None:
            self._finish(agent, turn, record, node)

        def handoff() -> None:
            # the prompt's new full blocks go to the store as soon as the DE holds them
            self._persist(
                agent.agent_id, node, plan.num_hit_blocks, record.prompt_tokens // self.block_size
            )
            record.handoff_s = self.loop.now
            self._count_arrival(plan.decode_replica, record.request_id)
            de.submit(
                DecodeTask(record, record.prompt_tokens + 1, record.gen_tokens - 1, decode_done)
            )

        if self.copy_rate:  # CPU: the transport's send, then the DE's receive and import
            self._cpu(send_bytes, lambda: self._cpu(prompt_bytes, handoff))
        else:
            self.loop.at(arrive, handoff)

    def _count_arrival(self, replica_id: str, request_id: str) -> None:
        """A request reaches its engine: was its planned work still in the view until now?"""
        planned = self.view.engines[replica_id].planned
        self.num_arrivals += 1
        if planned.expires.get(request_id, -math.inf) <= self.loop.now:
            self.num_forgotten += 1

    def _finish(self, agent: SimAgent, turn: int, record: TurnRecord, node: SimNode) -> None:
        record.finish_s = self.loop.now
        record.num_finishes += 1
        # blocks that filled while decoding (the last token has no KV yet)
        computed = record.prompt_tokens + record.gen_tokens - 1
        self._persist(
            agent.agent_id,
            node,
            record.prompt_tokens // self.block_size,
            computed // self.block_size,
        )
        nxt = turn + 1
        if nxt >= len(agent.appends):
            self._agents_left -= 1
            return
        if self._barrier_size and nxt - agent.first_turn == self.scenario.trace.warmup_turns:
            self._barrier.append((agent, nxt))
            if len(self._barrier) == self._barrier_size:  # every agent warmed up: go together
                self.timed_from = self.loop.now
                for a, t in self._barrier:
                    self._arrive(a, t)
            return
        self._arrive(agent, nxt)

    # ------------------------------------------------------------------ run
    def run(self, agents: list[SimAgent], until: float = math.inf) -> RunResult:
        """Replay `agents` (each from its `start_s`) until all finish or `until`."""
        wall = time.perf_counter()
        for agent in agents:
            self._prestore(agent)
        self._report(force=True)
        self.loop.after(self.scenario.cluster.report_interval_s, self._tick)
        self.loop.after(self.scenario.cluster.stale_after_s / 3, self._keepalive)
        self._agents_left = len(agents)
        warm = self.scenario.trace.warmup_turns
        self._barrier_size = len(agents) if warm and all(a.num_turns > warm for a in agents) else 0
        for agent in agents:
            self.loop.at(agent.start_s, self._arrive, agent, agent.first_turn)
        # NOTE: run on after the last turn until the last persistence write has landed, so
        # the byte counters are whole (JCT comes from the turns, not from the clock)
        snics = [n.snic for n in self.nodes.values()]
        self.loop.run(lambda: self._agents_left == 0 and not any(s.busy for s in snics), until)
        self._report(force=True)  # reports that name the last arrivals too
        views = [*self.view.engines.values(), *self.view.nodes.values()]
        timed = [r.finish_s for r in self.records if r.timed and not math.isnan(r.finish_s)]
        end = self.loop.now
        pe_busy = sum(e.busy_s for e in self.prefill.values())
        return RunResult(
            policy=self.policy_config.name,
            records=self.records,
            nodes=[
                NodeTraffic(
                    n.node_id,
                    n.role,
                    n.snic.total_bytes[0],
                    n.snic.total_bytes[1],
                    n.snic.busy_s,
                    n.snic.log,
                )
                for n in self.nodes.values()
            ],
            jct_s=(max(timed) - self.timed_from) if timed else math.nan,
            sim_end_s=end,
            bytes_hit_needed=self.bytes_hit_needed,
            num_events=self.loop.num_events,
            wall_s=time.perf_counter() - wall,
            pe_busy_frac=pe_busy / max(1e-9, end * len(self.prefill)),
            extra={
                "block_size": self.block_size,
                "block_bytes": self.block_bytes,
                "planned_left": sum(len(v.planned) for v in views),
                "forgotten_frac": self.num_forgotten / max(1, self.num_arrivals),
            },
        )
