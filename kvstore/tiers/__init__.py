"""Storage tiers of the KV store: DRAM on the Ray object store, NVMe files."""
