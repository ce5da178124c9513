"""Speculative decoding: draft-free drafters, exact verification, and when to speculate.

Drafters (`ngram`, `suffix`) propose tokens from text the sequence (or its tenant) has
already seen; the engine scores them in the same forward as the batch's normal decode
tokens and keeps the prefix the target model itself would have produced
(`engine/spec/verify.py`). `engine/spec/policy.py` decides per step how many tokens each
sequence drafts, from the measured cost of a step and the acceptance seen so far.
"""
