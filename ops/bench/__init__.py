"""Benchmarks: each prints a table, writes JSON (+ PNG) under bench-results/, runs its
baseline side by side in the same process and reports ratios."""
