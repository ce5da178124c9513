"""Where KV blocks live outside the engine, and how they are named.

Package map (reading path):
  1. keys.py   — BlockKey: hash chain over (parent key, block token ids), rooted in model id +
                 tenant salt, so a key hit is always a whole-prefix hit for the same tenant.

The tiered store (object store → NVMe behind a StorageNIC) lands with the KV-store issue.
"""
