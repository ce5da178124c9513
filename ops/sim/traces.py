"""Agentic trace generator shaped like the DualPath paper's coding-agent trajectories.

Per agent: an initial context, then turns that each append tool output and force a fixed
number of generated tokens (the paper's replay: round i+1's prompt = context_i + the
generated tokens + append_{i+1}). Token ids are random regular-vocabulary ids: generation is
forced, so content does not matter; block keys and sizes do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any


@dataclass
class Agent:
    context: list[int]
    appends: list[list[int]]
    gens: list[int]
    start_s: float = 0.0


def make_trace(args: Any, vocab: int) -> list[Agent]:
    """`args` needs: seed, agents, turns, context, append, gen (see ops/bench/agentic.py)."""
    rng = random.Random(args.seed)
    # NOTE: random ids from the regular vocabulary (no special tokens): the model's output
    # is forced to `gen` tokens, so content does not matter; block keys and sizes do.
    lo, hi = 200, min(vocab, 49000) - 1
    agents = []
    for _ in range(args.agents):
        context = [rng.randint(lo, hi) for _ in range(args.context)]
        appends = [
            [
                rng.randint(lo, hi)
                for _ in range(rng.randint(args.append * 3 // 4, args.append * 5 // 4))
            ]
            for _ in range(args.turns)
        ]
        gens = [rng.randint(args.gen * 4 // 5, args.gen * 6 // 5) for _ in range(args.turns)]
        agents.append(Agent(context, appends, gens))
    return agents
