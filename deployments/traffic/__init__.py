"""Traffic: KV movement between engines (manager.KVMover, in each engine process) and the
per-node TrafficManager deployment that aggregates what moved (issue 4 adds the SNIC)."""
