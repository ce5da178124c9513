"""Storage tiers of the KV store, each a `base.Tier` (the same verbs, one contract).

Files, in reading order:
  1. base.py         — Tier protocol (its docstring is the contract) and Evicted.
  2. dram.py         — DRAMTier: tier 1, an LRU of handles with a byte capacity (pure).
  3. nvme.py         — NVMeTier: tier 2, one checksummed file per block, atomic writes.
  4. object_store.py — [ray] DRAM blocks as Ray objects in the node's object store.
"""
