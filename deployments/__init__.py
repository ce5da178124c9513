"""Ray Serve shells over plain classes, and the pure scheduling policy they share.

Each shell (`*/deployment.py`, the only files here that touch Serve) builds one plain class
from its config section and forwards calls to it; `app/builder.py` binds them.

Files:
  protocol.py           — the messages between deployments (frozen dataclasses)
  options.py            — the shells' validated config sections; KVFailurePolicy
  scheduler/policy.py   — plan(request, view) -> Plan: PE, DE and read path (pure; ops/sim
                          runs it unchanged)
  scheduler/view.py     — ClusterView: engine loads, node SNIC queues, the KV index
  scheduler/deployment.py — Scheduler shell over ClusterView + policy
  engine_loop.py        — EngineLoop: an EngineCore stepping on its own thread
  engine_server.py      — EngineServer: what a PE and a DE replica share (loop, KVMover,
                          load reports, persistence)
  prefill/server.py     — PrefillServer: prefill, first token, KV handoff to the DE
  decode/server.py      — DecodeServer: receive the KV, decode in the continuous batch
  prefill/deployment.py, decode/deployment.py — PrefillEngine / DecodeEngine shells
  replica.py            — what both engine shells do at start (engine, transports, reports)
  traffic/mover.py      — KVMover: engine-to-engine KV moves, in each engine process
  traffic/node_store.py — NodeKVStore: a logical node's KV store (loads, persistence)
  traffic/deployment.py — TrafficManager shell over NodeKVStore, one per logical node
  routing.py            — ReplicaPinnedRouter: a job goes to the replica the plan chose
  tracing.py, metrics.py — one trace per request; every metric's name and labels

Reading path (a request's way): 1. protocol.py  2. scheduler/policy.py  3. prefill/server.py
4. traffic/mover.py  5. decode/server.py  6. engine_server.py + engine_loop.py
7. traffic/node_store.py  8. the shells (`*/deployment.py`, replica.py, routing.py).
"""
