"""Model definitions; `registry.py` maps a config's architecture name to a class."""
