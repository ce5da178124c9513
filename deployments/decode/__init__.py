"""Decode engine: DecodeServer (plain class) and its Serve shell (deployment.py)."""
