"""Agentic trace generators shaped like the DualPath paper's coding-agent trajectories.

Per agent: an initial context, then turns that each append tool output and force a fixed
number of generated tokens (the paper's replay: round i+1's prompt = context_i + the
generated tokens + append_{i+1}).

    make_trace        token ids, for the real app (ops/bench/agentic.py, ops/replay.py):
                      random regular-vocabulary ids, since generation is forced, content
                      does not matter; block keys and sizes do.
    make_sim_agents   lengths only, for the simulator, shaped like the paper's Table 2
                      datasets (PAPER_TRACES), optionally as windows of a few turns.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

# The one-machine benchmark's default trace, as make_trace's arguments: ops/bench/agentic.py's
# defaults (docs/BENCHMARKS.md's table), its sweep's `default` shape, the simulator's "bench"
BENCH_TRACE = MappingProxyType({"agents": 4, "turns": 6, "context": 1024, "append": 128, "gen": 8})


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


# ---------------------------------------------------------------------------- simulator


@dataclass(frozen=True, slots=True)
class TraceShape:
    """Per-trajectory means of one agentic dataset (the paper's Table 2 columns).

    `turns` (Table 2) cannot hold together with the other columns if every turn appends
    `append` and generates `gen` tokens: 157 x (429 + 176) = 95k tokens, against a mean
    total of 56k for the 64K set. The simulator keeps what sets the load of a turn: the
    mean context it reads (`context`), what it computes (`append`), what it decodes
    (`gen`), and the mean final length (`total`); the initial context and the number of
    turns follow: c0 = 2 x context - total (the context grows linearly from c0 to total),
    turns = (total - c0) / (append + gen).
    """

    name: str
    max_len: int
    turns: int  # Table 2 (reported; not used, see above)
    append: int
    gen: int
    total: int
    context: int

    @property
    def initial_context(self) -> int:
        return max(1, 2 * self.context - self.total)

    @property
    def sim_turns(self) -> int:
        return max(1, round((self.total - self.initial_context) / (self.append + self.gen)))


PAPER_TRACES: dict[str, TraceShape] = {
    "32k": TraceShape("32k", 32_768, 60, 608, 148, 28_639, 17_183),
    "48k": TraceShape("48k", 49_152, 106, 474, 172, 42_607, 25_120),
    "64k": TraceShape("64k", 65_536, 157, 429, 176, 55_958, 32_721),
}


@dataclass(slots=True)
class SimAgent:
    """One trajectory as lengths only: turn i's prompt = turn i-1's prompt + its generated
    tokens + appends[i]. `first_turn` > 0 starts the agent mid-trajectory (a window): the
    KV of everything before that turn's append is stored already."""

    agent_id: int
    initial_context: int
    appends: list[int]
    gens: list[int]
    first_turn: int = 0
    start_s: float = 0.0
    full_turns: int = 0  # the whole trajectory's turns (a window keeps fewer)

    def prompt_len(self, turn: int) -> int:
        return self.initial_context + sum(self.appends[: turn + 1]) + sum(self.gens[:turn])

    @property
    def num_turns(self) -> int:
        return len(self.appends) - self.first_turn


def make_sim_agents(
    shape: TraceShape,
    num_agents: int,
    seed: int,
    window_turns: int | None = None,
    spread: float = 0.25,
) -> list[SimAgent]:
    """`num_agents` trajectories shaped like `shape`, capped at `shape.max_len` tokens.

    Appends vary uniformly by ±50% around the mean, generations by ±20%, the initial
    context and the number of turns by ±`spread`. With `window_turns`, every agent runs only
    up to `window_turns` consecutive turns of its trajectory (its earlier context already
    stored), each turn equally likely to be in a window: the same mix of turn shapes, cold
    first turns included, with fewer requests.
    """
    rng = random.Random(seed)
    agents: list[SimAgent] = []
    for agent_id in range(num_agents):
        c0 = max(1, round(shape.initial_context * rng.uniform(1 - spread, 1 + spread)))
        turns = max(1, round(shape.sim_turns * rng.uniform(1 - spread, 1 + spread)))
        appends: list[int] = []
        gens: list[int] = []
        length = c0
        for _ in range(turns):
            append = max(1, round(shape.append * rng.uniform(0.5, 1.5)))
            gen = max(1, round(shape.gen * rng.uniform(0.8, 1.2)))
            if length + append + gen > shape.max_len:
                break
            appends.append(append)
            gens.append(gen)
            length += append + gen
        if not appends:  # the initial context alone nearly fills max_len: one short turn
            appends, gens = [1], [1]
        first, full = 0, len(appends)
        if window_turns is not None and full > window_turns:
            # NOTE: a window start from -(W-1) to T-1, clipped to the trajectory, includes
            # every turn with the same probability, so cold first turns (the whole initial
            # context computed) keep their share of the load; windows at the ends are short
            start = rng.randrange(1 - window_turns, full)
            first, end = max(0, start), min(full, start + window_turns)
            appends, gens = appends[:end], gens[:end]
        agents.append(SimAgent(agent_id, c0, appends, gens, first, full_turns=full))
    return agents


def sim_agents_from_trace(agents: list[Agent]) -> list[SimAgent]:
    """The lengths of a token-level trace (make_trace), e.g. the one-machine benchmark's."""
    return [
        SimAgent(
            i,
            len(a.context),
            [len(x) for x in a.appends],
            list(a.gens),
            0,
            a.start_s,
            full_turns=len(a.appends),
        )
        for i, a in enumerate(agents)
    ]
