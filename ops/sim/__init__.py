"""Cluster simulator pieces shared with the benchmarks (agentic traces)."""
