"""PII masking: each category inside sentences, numbers and ids that must stay, Luhn, China ID
checksum, nested values and the logging filter."""

from __future__ import annotations

import io
import logging

import pytest

from app.pii import PIIFilter, cn_id_check_char, luhn_ok, mask, mask_value

CN_ID_17 = "11010519491231002"
CN_ID = CN_ID_17 + cn_id_check_char(CN_ID_17)
CN_ID_BAD = CN_ID_17 + ("1" if CN_ID[-1] != "1" else "2")


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("Contact john.doe@example.com today.", "Contact [EMAIL] today."),
        ("from <li.wei+billing@mail.corp.example.cn>, cc a_b@x.io", "from <[EMAIL]>, cc [EMAIL]"),
        ("user=Jane_Smith99@sub-domain.example.org;", "user=[EMAIL];"),
    ],
)
def test_email(text, masked):
    assert mask(text) == masked


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("Call +1 (415) 555-0132 now", "Call [PHONE] now"),
        ("London office: +44 20 7946 0958.", "London office: [PHONE]."),
        ("手机 +86 138 0013 8000，谢谢", "手机 [PHONE]，谢谢"),
        ("dial +49-30-1234-5678 or +33.6.12.34.56.78", "dial [PHONE] or [PHONE]"),
        ("US (415) 555-0132, 415-555-0132 and 415.555.0132!", "US [PHONE], [PHONE] and [PHONE]!"),
        ("toll free 1-800-555-0199.", "toll free [PHONE]."),
        ("mobile 13800138000, backup:15912345678.", "mobile [PHONE], backup:[PHONE]."),
        ("请联系13800138000", "请联系[PHONE]"),
    ],
)
def test_phone(text, masked):
    assert mask(text) == masked


def test_china_id_checksum():
    assert CN_ID == "11010519491231002X"  # the textbook example
    assert mask(f"身份证 {CN_ID} 已验证") == "身份证 [ID] 已验证"
    assert mask(f"id={CN_ID.lower()}.") == "id=[ID]."
    # a wrong check char is still an ID-shaped token: masked all the same, over-cautious
    assert mask(f"typo {CN_ID_BAD} here") == "typo [ID] here"
    # and never read as a phone number (it holds 11-digit runs that start with 1[3-9])
    assert "[PHONE]" not in mask("id 130105199001013008")


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("SSN 123-45-6789 on file", "SSN [ID] on file"),
        ("ssn:078-05-1120.", "ssn:[ID]."),
        ("not an SSN: 000-12-3456, 666-12-3456, 2024-06-03", None),
    ],
)
def test_ssn(text, masked):
    assert mask(text) == (masked or text)


@pytest.mark.parametrize(
    "card",
    [
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "4012888888881881",
        "5555 5555 5555 4444",
        "3782 822463 10005",  # Amex, 4-6-5
        "6011111111111117",
        "6221260000000000",  # UnionPay
        "2223000048400011",  # Mastercard 2-series
        "4222222222222",  # 13 digits
    ],
)
def test_luhn_valid_cards_are_masked(card):
    assert luhn_ok(card.replace(" ", "").replace("-", ""))
    assert mask(f"paid with {card}, thanks") == "paid with [CARD], thanks"


@pytest.mark.parametrize(
    "number",
    ["4111 1111 1111 1112", "4111111111111121", "5555-5555-5555-4445", "1234567890123456"],
)
def test_luhn_invalid_numbers_stay(number):
    text = f"reference {number} kept"
    assert mask(text) == text


def test_card_is_not_half_eaten_and_neighbours_stay():
    text = "card 4111 1111 1111 1111 2048 tokens; again 4111111111111111."
    assert mask(text) == "card [CARD] 2048 tokens; again [CARD]."


def test_long_number_runs_stay():
    ids = " ".join(str(10000 + i * 7919 % 40000) for i in range(20000))  # e.g. token ids
    assert mask(ids) == ids
    assert mask("x 1 2 4111 1111 1111 1111 7") == "x 1 2 [CARD] 7"  # 7: no 17-digit card


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("client 192.168.1.20 connected", "client [IP] connected"),
        ("bind 0.0.0.0:8000 and 10.0.0.1.", "bind [IP]:8000 and [IP]."),
        ("peer=(172.16.254.3)", "peer=([IP])"),
        ("not an IP: 256.1.1.1 or 1.2.3.4.5", None),
    ],
)
def test_ipv4(text, masked):
    assert mask(text) == (masked or text)


@pytest.mark.parametrize(
    "text",
    [
        "42",
        "generated 2048 tokens in 3.14 s",
        "deadline 1795399200 (unix), 1795399200123 ms, 1795399200123456789 ns",
        "ray 2.60.0, torch 2.13.0, python 3.11.9",
        "request chatcmpl-3f2a9c41b8e5d7a6c0f1 finished",
        "trace 550e8400-e29b-41d4-a716-446655440000 id=0af7651916cd43dd8448eb211c80319c",
        "req-13800138000 at 2026-11-23T10:00:00.123Z, usage +2048 -512",
        "prompt_tokens=123456789012 cached=4096 cost=0.000123 USD",
        "plain words, no data at all",
    ],
)
def test_non_pii_stays(text):
    assert mask(text) == text


def test_mixed_sentence_keeps_the_rest_exactly():
    text = (
        "Tenant acme (user bob@acme.io, +1 415 555 0132) from 203.0.113.7 paid "
        "with 5555555555554444; 512 tokens, 2.60.0"
    )
    assert mask(text) == (
        "Tenant acme (user [EMAIL], [PHONE]) from [IP] paid with [CARD]; 512 tokens, 2.60.0"
    )


def test_mask_value_nested():
    value = {
        "user": "ann@example.com",
        "n": 42,
        "ok": True,
        "tags": ["ip 10.1.2.3", ("tel 13800138000", None)],
        "inner": {"ann@example.com": {"card": "4111111111111111"}},
    }
    assert mask_value(value) == {
        "user": "[EMAIL]",
        "n": 42,
        "ok": True,
        "tags": ["ip [IP]", ("tel [PHONE]", None)],
        "inner": {"ann@example.com": {"card": "[CARD]"}},  # keys unchanged
    }
    assert mask_value(3.5) == 3.5 and mask_value(None) is None


@pytest.fixture
def captured():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s user=%(user)s"))
    logger = logging.getLogger("test_pii.captured")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield logger, handler, stream
    logger.removeHandler(handler)


def test_filter_masks_formatted_message_and_extra_fields(captured):
    logger, handler, stream = captured
    handler.addFilter(PIIFilter(fields=("user",)))
    logger.info("login by %s from %s (%d tries)", "eve@example.com", "198.51.100.4", 3,
                extra={"user": "call 13800138000"})  # fmt: skip
    logger.info("token count %d", 2048, extra={"user": None})
    assert stream.getvalue().splitlines() == [
        "INFO login by [EMAIL] from [IP] (3 tries) user=call [PHONE]",
        "INFO token count 2048 user=None",
    ]


def test_filter_masks_exception_text(captured):
    logger, handler, stream = captured
    handler.addFilter(PIIFilter())
    try:
        raise ValueError("bad address eve@example.com")
    except ValueError:
        logger.exception("failed for %s", "eve@example.com", extra={"user": "-"})
    out = stream.getvalue()
    assert "eve@example.com" not in out
    assert "failed for [EMAIL]" in out and "ValueError: bad address [EMAIL]" in out


def test_filter_always_passes_records():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "n=%d", (1,), None)
    assert PIIFilter().filter(record) is True
    assert (record.msg, record.args) == ("n=1", None)
    bad = logging.LogRecord("x", logging.INFO, __file__, 1, "%d tries", ("a@b.io",), None)
    assert PIIFilter().filter(bad) is True  # a bad format call does not raise
    assert bad.msg == "%d tries % ('[EMAIL]',)"
