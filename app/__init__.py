"""The HTTP edge and the public Python API: OpenAI requests in, the PD request path out.

Package map, in the order one chat request passes through it:
  1. ingress.py        — the Serve deployment: HTTP routes and handle methods, one line each
  2. frontend.py       — root span, API key → tenant, body, tier, error → OpenAI error
  3. service.py        — ChatService: prompt → admission → n choices → deltas (one path)
     formats.py        — a formatter per API shape (chat.completion / text_completion)
     choices.py        — the n choices' outputs merged as they come
  4. admission/        — gate.py (limits, queue, lease, bill; the one auditor), queues.py,
                         ratelimit.py, fair.py, capacity.py, section.py
  5. choice_flow.py    — ChoiceFlow: plan → stored-KV reads → PE (first token) → DE
  6. cluster.py        — the seam to the deployments (Cluster); serve_cluster.py over Serve
  7. request_meter.py  — usage and timings from the outputs: response, bill, metrics
Around it: api/ (schemas, errors, HTTP edges, SSE), auth.py, pricing.py, ledger.py,
usage_api.py (GET /v1/usage), audit.py, pii.py, root_spans.py, outcome_metrics.py,
logprobs.py, config.py (AppConfig), builder.py (build_app), client.py (DualPathClient).
"""
