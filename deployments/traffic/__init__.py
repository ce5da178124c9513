"""Traffic: KV movement between engines, and each logical node's KV store.

Files, in reading order:
  1. mover.py      — KVMover, in each engine process: a request's KV layer by layer over the
                     KV transport (NIXL, else the object store), leases held, bytes counted.
  2. node_store.py — NodeKVStore, one per logical node: stored-KV loads and persistence
                     through the node's TieredStore and SNIC; the NodeReport for the Scheduler.
  3. deployment.py — TrafficManager, the Serve shell over a NodeKVStore [ray].
"""
