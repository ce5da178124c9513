"""Scheduler: the global view (view.py), the pure plan policy (policy.py), its Serve shell."""
