"""`python -m ops` (also installed as `dps`): model fetch, interactive chat, benchmarks, API
keys and the usage ledger, status / drain, KV tier checks, traces, workload replay and the
cluster simulator."""

from __future__ import annotations

import argparse
import importlib
import sys
import uuid
from pathlib import Path

from ops.logging import setup_logging

# `python -m ops bench <name>` runs ops/bench/<name, - as _>.py's main(argv)
BENCHMARKS = (
    "engine",
    "serve",
    "serve-peer",
    "agentic",
    "kv-hit",
    "admission",
    "tracing",
    "soak",
    "sparse-attention",
    "kernels",
    "structured",
    "quality",
    "speculative",
)


def _cmd_model_fetch(args: argparse.Namespace) -> int:
    from ops.model_fetch import convert_gguf, ensure_default_model

    if args.gguf:
        from engine.config import model_cache_dir

        out = args.out or model_cache_dir() / Path(args.gguf).stem
        path = convert_gguf(Path(args.gguf), Path(out))
    else:
        path = ensure_default_model(force=args.force)
    print(path)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from rich.console import Console

    from engine import EngineConfig, EngineCore, EngineRequest, SamplingParams
    from engine.config import default_model_dir

    console = Console()
    model = Path(args.model) if args.model else default_model_dir()
    engine = EngineCore(EngineConfig(model=model, dtype=args.dtype, num_threads=args.threads))
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed
    )
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    console.print(
        f"[bold]dualpath-serve chat[/] — {model.name} ({args.dtype}); "
        "empty line or Ctrl-D to quit, /reset to clear history"
    )
    prompts = iter(args.prompt) if args.prompt else None
    while True:
        try:
            user = next(prompts) if prompts else console.input("[bold green]you> [/]")
        except (EOFError, StopIteration, KeyboardInterrupt):
            break
        if not user.strip():
            break
        if user.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": user})
        rid = uuid.uuid4().hex
        try:
            engine.add_request(EngineRequest(rid, engine.tokenizer.encode_chat(messages), params))
        except ValueError as e:  # InvalidRequestError, ChatTemplateError
            console.print(f"[red]error:[/] {e} (/reset clears the history)")
            messages.pop()
            continue
        console.print("[bold blue]assistant> [/]", end="")
        reply = ""
        while engine.has_unfinished():
            for out in engine.step():
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
                reply = out.text
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"ops.bench.{args.which.replace('-', '_')}")
    return module.main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dps", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="cmd", required=True)

    model = sub.add_parser("model", help="model management").add_subparsers(
        dest="model_cmd", required=True
    )
    fetch = model.add_parser("fetch", help="convert the default GGUF (or --gguf) once")
    fetch.add_argument("--gguf", help="convert this llama-architecture GGUF instead")
    fetch.add_argument("--out", help="output dir (default: the model cache)")
    fetch.add_argument("--force", action="store_true", help="convert again even if present")
    fetch.set_defaults(func=_cmd_model_fetch)

    chat = sub.add_parser("chat", help="chat with a model from the terminal")
    chat.add_argument("--model", help="HF-style model dir (default: converted SmolLM2)")
    chat.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    chat.add_argument("--threads", type=int, default=None)
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--top-p", type=float, default=0.9)
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--prompt", action="append", help="non-interactive: send these turns")
    chat.set_defaults(func=_cmd_chat)

    bench = sub.add_parser("bench", help="run a benchmark (ops/bench/<name>.py)")
    bench.add_argument("which", choices=BENCHMARKS)
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    bench.set_defaults(func=_cmd_bench)

    from ops.cluster import add_parsers as add_cluster_parsers
    from ops.dashboards.render import add_parsers as add_dashboard_parsers
    from ops.kvtool import add_parsers as add_kv_parsers
    from ops.replay import add_parsers as add_replay_parsers
    from ops.sim.cli import add_parsers as add_sim_parsers
    from ops.status import add_drain_parsers
    from ops.status import add_parsers as add_status_parsers
    from ops.tenants import add_parsers as add_tenant_parsers
    from ops.traceview import add_parsers as add_trace_parsers

    add_tenant_parsers(sub)
    add_kv_parsers(sub)
    add_status_parsers(sub)
    add_drain_parsers(sub)
    add_trace_parsers(sub)
    add_replay_parsers(sub)
    add_dashboard_parsers(sub)
    add_sim_parsers(sub)
    add_cluster_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return args.func(args)
