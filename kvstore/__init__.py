"""Where KV blocks live outside the engine, how they are named, and how they move (no Ray
except the [ray] files).

Files:
  keys.py                  — block keys: a hash chain over token ids, rooted in model id +
                             tenant salt, so a key hit is always a whole-prefix hit
  block.py                 — a stored block: self-checking header + raw tensor bytes
  index.py                 — KVIndex: which blocks exist, in which tier (TierName), on which
                             node; fed by IndexEvents (the Scheduler holds the cluster's)
  tiers/base.py            — Tier: the protocol every tier keeps (its docstring the contract)
  tiers/dram.py            — DRAMTier: tier 1, an LRU of handles with a byte capacity
  tiers/nvme.py            — NVMeTier: tier 2, one checksummed file per block
  tiers/object_store.py    — [ray] tier 1's blocks as Ray objects on the node's object store
  snic.py                  — StorageNIC: a node's storage NIC as a prioritised I/O queue
  store.py                 — TieredStore: one node's store: load / persist across the tiers,
                             through the SNIC; a missing or corrupt block is a miss
  transfer/base.py         — KVTransport: engine-to-engine KV layers; create_transport
  transfer/nixl.py         — over NIXL (import-guarded)
  transfer/object_store.py — [ray] over the Ray object store

Reading path: 1. keys.py  2. block.py  3. tiers/base.py, tiers/dram.py, tiers/nvme.py
4. snic.py  5. store.py  6. index.py  7. transfer/.
"""
