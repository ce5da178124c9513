"""schemathesis hooks for test_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

`positive_data_acceptance_with_rules`: schemathesis's positive-data check (a body the
schema accepts must not be refused), except for the server's rules across fields that JSON
Schema cannot state: a tool message must answer an earlier call, `tool_choice` must name a
listed tool, a schema must compile to a grammar, tool names are unique. A schema-valid body
breaking one gets a 400 whose `code` names the rule; only those codes pass, so any other
400 for a schema-valid body still fails the run.
"""

from __future__ import annotations

import json

import schemathesis

# The 400 codes of rules across fields (app/tools.py, app/service.py, app/api/schemas.py)
RULE_CODES = {
    "invalid_schema",  # a JSON schema the grammar library cannot compile
    "invalid_tool_message",  # a tool message answering no call; bad call arguments
    "unknown_tool",  # tool_choice names a function not in tools
    "invalid_tool_choice",  # tool_choice without tools
    "duplicate_tool_name",
    "unsupported_combination",  # ignore_eos with a grammar
    "unsupported_parameter",  # a field that would change the output and is not implemented
    # prompt (after templating: tool definitions included) + max_tokens beyond the model's
    # context or the engines' KV pool: a limit of the running deployment, not of the schema
    "context_length_exceeded",
}
ALLOWED = range(200, 400), {401, 403, 404, 409, 429}


@schemathesis.check
def positive_data_acceptance_with_rules(ctx, response, case) -> None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return
    status = response.status_code
    if status in ALLOWED[0] or status in ALLOWED[1] or status >= 500:
        return  # 5xx are not_a_server_error's to report
    code = None
    if status == 400:
        try:
            code = json.loads(response.content)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
    if code in RULE_CODES:
        return
    raise AssertionError(f"Valid data should have been accepted (got {status}, code {code!r})")
