"""The structured-output benchmark's workload (ops/bench/structured.py): a support-ticket
JSON schema, 10 tool schemas (the first 3 offered to the decode rows' tool calls) and the
prompts, with the grammars the app builds from them (`app.tools.output_grammar`).

Realistic on purpose: enums, bounded integers, strings with minLength/maxLength or a
pattern (dates, times, e-mail addresses, currency codes), bounded arrays, optional fields.
"""

from __future__ import annotations

from typing import Any

from app.api.messages import FunctionDef, JsonSchemaSpec, ResponseFormat, Tool
from app.tools import ToolPlan, output_grammar


def _str(lo: int = 0, hi: int | None = None, pattern: str | None = None) -> dict[str, Any]:
    spec = {"type": "string", "minLength": lo or None, "maxLength": hi, "pattern": pattern}
    return {k: v for k, v in spec.items() if v is not None}


def _num(lo: float, hi: float, kind: str = "integer") -> dict[str, Any]:
    return {"type": kind, "minimum": lo, "maximum": hi}


def _obj(props: dict[str, Any], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    required = [k for k in props if k not in optional]
    return {"type": "object", "properties": props, "required": required} | NO_EXTRA


def _enum(*values: str) -> dict[str, Any]:
    return {"enum": list(values)}


def _arr(items: dict[str, Any], lo: int, hi: int) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": lo, "maxItems": hi}


NO_EXTRA = {"additionalProperties": False}
BOOL = {"type": "boolean"}
DATE = _str(pattern=r"^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$")
CLOCK = _str(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
EMAIL = _str(pattern=r"^[a-z0-9._-]{1,32}@[a-z0-9-]{1,32}\.[a-z]{2,6}$")
CODE2, CODE3 = _str(pattern="^[A-Z]{2}$"), _str(pattern="^[A-Z]{3}$")
# fmt: off
TICKET_SCHEMA = _obj({
    "category": _enum("billing", "technical", "account", "shipping", "other"),
    "priority": _enum("low", "medium", "high", "urgent"),
    "sentiment": _enum("negative", "neutral", "positive"), "product": _str(2, 40),
    "summary": _str(10, 160), "customer_tier": _enum("free", "pro", "enterprise"),
    "estimated_minutes": _num(5, 480), "needs_human": BOOL, "tags": _arr(_str(2, 24), 1, 4)})
TICKETS = (
    "I was charged twice for my Pro plan this month and nobody answers my emails. Fix it.",
    "The mobile app crashes every time I open the settings page since yesterday's update.",
    "How do I add a second admin to our enterprise account? The docs are unclear.",
    "My order #48213 shows delivered but the parcel never arrived. I need it by Friday.")
TOOL_ASKS = (
    "What will the weather be like in Lisbon for the next three days?",
    "Find me a flight from Amsterdam to Boston on 2025-03-14 for two people, economy.",
    "Put a one-hour design review with ana@example.com on 2025-02-03 at 10:00.",
    "Is it going to rain in Osaka this weekend? Give me hourly detail.")


def _tool_specs(variant: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, description, parameters) of 10 tools, the first 3 the decode rows' tools.
    `variant` is one value of `create_ticket`'s project enum (a tenant's projects, say)."""
    return [
        ("get_weather", "Weather forecast for a city.", _obj({
            "city": _str(2, 60), "country_code": CODE2, "unit": _enum("celsius", "fahrenheit"),
            "days": _num(1, 14), "include": _arr(_enum("hourly", "alerts", "air", "uv"), 1, 4)})),
        ("search_flights", "Search one-way flights.", _obj({
            "origin": CODE3, "destination": CODE3, "date": DATE, "passengers": _num(1, 9),
            "cabin": _enum("economy", "premium_economy", "business", "first")})),
        ("create_event", "Create a calendar event.", _obj({
            "title": _str(3, 80), "date": DATE, "start": CLOCK, "duration_minutes": _num(5, 480),
            "attendees": _arr(EMAIL, 1, 8), "reminder": _enum("none", "5m", "15m", "1h", "1d")})),
        ("create_ticket", "Open a ticket in the issue tracker.", _obj({
            "project": _enum(f"PRJ{variant:04d}", "OPS", "WEB", "DATA"), "title": _str(5, 120),
            "severity": _enum("sev1", "sev2", "sev3", "sev4"), "labels": _arr(_str(0, 20), 0, 5)})),
        ("send_email", "Send an email.", _obj({
            "to": _arr(EMAIL, 1, 20), "subject": _str(0, 120), "body": _str(0, 2000),
            "importance": _enum("low", "normal", "high")}, optional=("importance",))),
        ("convert_currency", "Convert an amount between currencies.", _obj({
            "amount": _num(0, 1e9, "number"), "from_currency": CODE3, "to_currency": CODE3})),
        ("lookup_order", "Look up an order by its id.", _obj({
            "order_id": _str(pattern="^[0-9]{5,10}$"), "include_items": BOOL},
            optional=("include_items",))),
        ("book_restaurant", "Reserve a table.", _obj({
            "restaurant": _str(2, 80), "date": DATE, "time": CLOCK, "party_size": _num(1, 20),
            "notes": _str(0, 200)}, optional=("notes",))),
        ("search_docs", "Search the internal documentation.", _obj({
            "query": _str(2, 200), "space": _enum("engineering", "sales", "support", "hr"),
            "limit": _num(1, 50)}, optional=("space", "limit"))),
        ("set_thermostat", "Set a room's target temperature.", _obj({
            "room": _enum("living", "kitchen", "bedroom", "office"),
            "celsius": _num(10, 30, "number"), "mode": _enum("heat", "cool", "auto", "off")})),
    ]
# fmt: on


def tools(count: int, variant: int = 0) -> tuple[Tool, ...]:
    specs = _tool_specs(variant)[:count]
    defs = [FunctionDef(name=n, description=d, parameters=p) for n, d, p in specs]
    return tuple(Tool(type="function", function=f) for f in defs)


def tool_grammar(offered: tuple[Tool, ...]) -> str:
    """A required single call to one of `offered`, as the app builds it."""
    return output_grammar(ToolPlan(tools=offered, choice="required", parallel=False), None) or ""


def ticket_grammar() -> str:
    spec = JsonSchemaSpec(name="ticket", schema=TICKET_SCHEMA)
    return output_grammar(ToolPlan(), ResponseFormat(type="json_schema", json_schema=spec)) or ""
