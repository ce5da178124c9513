"""PII masking for anything that is logged: `mask` swaps personal data for typed placeholders.

Placeholders: `[EMAIL]`, `[PHONE]` (international `+<cc> ...`, US `(415) 555-0132` /
`415-555-0132` / `415.555.0132`, mainland-China mobiles `13800138000`), `[ID]` (mainland-China
resident IDs, US SSNs), `[CARD]` (13-19 digit payment cards, contiguous or in the printed
layouts with single spaces or dashes, Luhn-valid and starting with 2-6, the major industry
identifiers of card networks) and `[IP]` (IPv4).

Rules run in a fixed order (e-mail, IP, China ID, SSN, international phone, card, US phone,
China mobile) and every number rule needs a clean boundary on both sides: no ASCII letter, digit,
`_`, `.`, `+` or `-` before, no letter or digit (nor `.`/`-` then a digit) after. So plain
numbers (`42`, `2048`, unix times, `3.14`), versions (`2.60.0`) and hex or UUID request ids
(`chatcmpl-3f2a9c...`) stay, a card is never half-eaten by a phone rule and an ID never becomes
a phone.

Over-caution, on purpose (these are logs, not data): an ID-shaped token (region code, a
`YYYYMMDD` birth date, sequence, check char) is `[ID]` even when its ISO 7064 MOD 11-2 check
char is wrong, unless it then passes as a card; any four dotted octets (`1.2.3.4`) are `[IP]`;
about one in twenty runs of four space-separated 4-digit numbers looks like a card.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

_L = r"(?<![A-Za-z0-9_.+\-])"
_R = r"(?![A-Za-z0-9_]|[.\-]\d)"
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"

_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"
)
_IP = re.compile(rf"(?<![A-Za-z0-9_.]){_OCTET}(?:\.{_OCTET}){{3}}{_R}")
_CN_ID = re.compile(
    rf"{_L}[1-9]\d{{5}}(?:18|19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{{3}}[\dXx]{_R}"
)
_SSN = re.compile(rf"{_L}(?!000|666|9)\d{{3}}-(?!00)\d{{2}}-(?!0000)\d{{4}}{_R}")
_INTL_PHONE = re.compile(r"(?<![A-Za-z0-9_+])\+\d{1,3}(?:[ .\-]?(?:\(\d{1,5}\)|\d{1,5}))+")
_CARD = re.compile(  # contiguous, 4-6-4/4-6-5 (Amex, Diners), 4-4-4-1..4, 4-4-4-4-1..3
    rf"{_L}(?:\d{{13,19}}|\d{{4}}([ \-])\d{{6}}\1\d{{4,5}}"
    rf"|\d{{4}}([ \-])\d{{4}}\2\d{{4}}\2(?:\d{{4}}\2\d{{1,3}}|\d{{1,4}})){_R}"
)
_US_PHONE = re.compile(
    rf"{_L}(?:1[ .\-])?(?:\([2-9]\d\d\) ?|[2-9]\d\d[.\-])[2-9]\d\d[.\-]\d{{4}}{_R}"
)
_CN_MOBILE = re.compile(rf"{_L}1[3-9]\d{{9}}{_R}")

_CN_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CN_CHECK = "10X98765432"


def cn_id_check_char(first17: str) -> str:
    """The ISO 7064 MOD 11-2 check character of a mainland-China resident ID's 17 digits."""
    return _CN_CHECK[sum(int(d) * w for d, w in zip(first17, _CN_WEIGHTS, strict=True)) % 11]


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def _is_card(digits: str) -> bool:
    return (
        13 <= len(digits) <= 19 and digits.isdecimal() and digits[0] in "23456" and luhn_ok(digits)
    )


def _cn_id(m: re.Match[str]) -> str:
    token = m.group()
    if cn_id_check_char(token[:17]) == token[17].upper():
        return "[ID]"
    return "[CARD]" if _is_card(token) else "[ID]"


def _intl_phone(m: re.Match[str]) -> str:
    n = sum(c.isdigit() for c in m.group())
    return "[PHONE]" if 7 <= n <= 15 else m.group()


def _card(m: re.Match[str]) -> str:
    """The longest card among the match's leading groups (a trailing group may be a neighbour)."""
    text = m.group()
    groups = re.split(r"[ \-]", text)
    for j in range(len(groups), 0, -1):
        if _is_card("".join(groups[:j])):
            return "[CARD]" + text[sum(map(len, groups[:j])) + j - 1 :]
    return text


_RULES: tuple[tuple[re.Pattern[str], Any], ...] = (
    (_EMAIL, "[EMAIL]"),
    (_IP, "[IP]"),
    (_CN_ID, _cn_id),
    (_SSN, "[ID]"),
    (_INTL_PHONE, _intl_phone),
    (_CARD, _card),
    (_US_PHONE, "[PHONE]"),
    (_CN_MOBILE, "[PHONE]"),
)


def mask(text: str) -> str:
    """`text` with e-mails, phones, IDs, cards and IPv4 addresses replaced by placeholders."""
    if not any(c.isdigit() or c == "@" for c in text):
        return text
    for pattern, repl in _RULES:
        text = pattern.sub(repl, text)
    return text


def mask_value(v: Any) -> Any:
    """Strings masked, recursively through dict values, lists and tuples; the rest as is."""
    if isinstance(v, str):
        return mask(v)
    if isinstance(v, dict):
        return {k: mask_value(x) for k, x in v.items()}
    if isinstance(v, list):
        return [mask_value(x) for x in v]
    if isinstance(v, tuple):
        return tuple(mask_value(x) for x in v)
    return v


class PIIFilter(logging.Filter):
    """Masks each record's formatted message, its exception text and the named extra fields
    (`logger.info(..., extra={"user": ...})`); never drops a record."""

    def __init__(self, fields: Iterable[str] = (), name: str = ""):
        super().__init__(name)
        self.fields = tuple(fields)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format call must not raise at the logging call site
            message = f"{record.msg} % {record.args!r}"
        record.msg = mask(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            # Formatter.format reuses exc_text when set, so the traceback is printed masked
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask(record.exc_text)
        for name in self.fields:
            if hasattr(record, name):
                setattr(record, name, mask_value(getattr(record, name)))
        return True
