"""Prefill engine: PrefillServer (plain class) and its Serve shell (deployment.py)."""
