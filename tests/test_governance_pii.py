"""PII detectors against independent references (python-stdnum: Luhn, IBAN mod-97, US SSN, Spanish DNI),
and the stream guard against batch redaction under arbitrary chunking."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stdnum import iban as std_iban
from stdnum import luhn
from stdnum.es import dni as std_dni
from stdnum.iso7064 import mod_97_10
from stdnum.us import ssn as std_ssn

from serving.governance.errors import PIIBlocked
from serving.governance.pii import IBAN_LENGTHS, PLACEHOLDER, StreamGuard, redact, scan

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_card(prefix: str, length: int) -> str:
    body = prefix + "".join(random.Random(length).choice("0123456789") for _ in range(length - len(prefix) - 1))
    return body + luhn.calc_check_digit(body)


def make_iban(country: str, seed: int) -> str:
    rng = random.Random(seed)
    bban = "".join(rng.choice("0123456789") for _ in range(IBAN_LENGTHS[country] - 4))
    return country + mod_97_10.calc_check_digits(bban + country) + bban


def iban_reference(value: str) -> bool:
    """stdnum's ISO 7064 mod 97-10 over the rearranged IBAN, with the country's length (stdnum.iban also
    checks each country's BBAN layout, which random test BBANs do not follow)."""
    v = value.replace(" ", "")
    return len(v) == IBAN_LENGTHS.get(v[:2]) and mod_97_10.is_valid(v[4:] + v[:4])


def group4(s: str) -> str:
    return " ".join(s[i:i + 4] for i in range(0, len(s), 4))


SAMPLES = {
    "email": ["john.doe@example.com", "a.b+tag@mail.co.uk", "X_Y-9@sub.example.org"],
    "phone": ["+44 20 7946 0958", "(555) 123-4567", "555-123-4567", "+1-202-555-0173", "0044 161 496 0000",
              "+33 1 23 45 67 89"],
    "card": ["4111 1111 1111 1111", "5555-5555-5555-4444", "378282246310005", make_card("4", 16),
             group4(make_card("51", 16)), make_card("6011", 19)],
    "iban": ["DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432", group4(make_iban("FR", 1)),
             "NL91 ABNA 0417 1643 00", make_iban("IT", 2), group4(make_iban("PL", 3))],
    "national_id": ["123-45-6789", "AB 12 34 56 C", "CE123456D", "12345678Z", "X1234567L"],
    "secret": ["sk-proj-abcDEF1234567890abcdefXYZ", "AKIAIOSFODNN7EXAMPLE", "ghp_" + "a1B2" * 9,
               "lpx-0123456789abQWERTYuiopASDFGHjklZXCVBnm1234567890_-", "xoxb-1234567890-abcdefghij",
               "AIza" + "B" * 35, "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAK\n-----END RSA PRIVATE KEY-----"],
}
ALL = [(kind, v) for kind, values in SAMPLES.items() for v in values]


def test_samples_are_valid_by_reference():
    for v in SAMPLES["card"]:
        assert luhn.is_valid(v.replace(" ", "").replace("-", ""))
    for v in SAMPLES["iban"]:
        assert iban_reference(v)
    assert std_iban.is_valid("DE89 3704 0044 0532 0130 00") and std_iban.is_valid("NL91 ABNA 0417 1643 00")
    assert std_ssn.is_valid("123-45-6789") and std_dni.is_valid("12345678Z")


@pytest.mark.parametrize("kind,value", ALL, ids=[f"{k}-{i}" for i, (k, _) in enumerate(ALL)])
def test_each_kind_is_found_and_redacted(kind, value):
    text = f"Hello, please use {value} for this, thanks."
    out, kinds = redact(text)
    assert kinds == [kind]
    assert out == f"Hello, please use {PLACEHOLDER[kind]} for this, thanks."


def test_ordinary_text_has_no_findings():
    text = ("On 2026-11-26 at 10:30 we shipped v1.2.3 (build 4521) to 12 regions; revenue was $1,234,567.89, "
            "order #88213, ticket ABC-1234, room 101, ISBN-like 978 0 306 40615 7, port 8080, pi 3.14159265.")
    assert scan(text) == []


@FAST
@given(st.text(alphabet="0123456789", min_size=13, max_size=19))
def test_card_detection_matches_luhn_reference(digits):
    kinds = redact(f"pay {digits} now")[1]
    assert ("card" in kinds) == luhn.is_valid(digits)


@FAST
@given(st.sampled_from(sorted(IBAN_LENGTHS)), st.integers(0, 10**6), st.booleans(), st.integers(4, 30))
def test_iban_detection_matches_mod97_reference(country, seed, spaced, flip):
    good = make_iban(country, seed)
    show = group4 if spaced else (lambda s: s)
    assert "iban" in redact(f"IBAN: {show(good)}.")[1]
    pos = min(flip, len(good) - 1)
    bad = good[:pos] + str((int(good[pos]) + 1) % 10) + good[pos + 1:] if good[pos].isdigit() else good
    assert ("iban" in redact(f"IBAN: {show(bad)}.")[1]) == iban_reference(bad)


@FAST
@given(st.integers(0, 999), st.integers(0, 99), st.integers(0, 9999))
def test_ssn_detection_matches_reference(area, group, serial):
    value = f"{area:03d}-{group:02d}-{serial:04d}"
    assert ("national_id" in redact(f"ssn {value} on file")[1]) == std_ssn.is_valid(value)


@FAST
@given(st.integers(0, 99999999), st.sampled_from("TRWAGMYFPDXBNJZSQVHLCKE"))
def test_dni_detection_matches_reference(number, letter):
    value = f"{number:08d}{letter}"
    assert ("national_id" in redact(f"DNI {value}.")[1]) == std_dni.is_valid(value)


FILLER = st.sampled_from(["the", "report", "is", "due", "Friday,", "call", "me", "at", "or", "\n", "ok.", "x", "42"])
PIECES = st.one_of(FILLER, st.sampled_from([v for _, v in ALL]))


def _stream(text: str, cuts: list[int], guard: StreamGuard) -> list[str]:
    bounds = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    out = [guard.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])]
    return out + [guard.flush()]


@settings(max_examples=200, deadline=None)
@given(st.lists(PIECES, min_size=1, max_size=40), st.lists(st.integers(0, 10**6), max_size=40))
def test_stream_guard_equals_batch_redaction_for_any_chunking(words, cuts):
    text = " ".join(words)
    streamed = "".join(_stream(text, cuts, StreamGuard("redact")))
    assert streamed == redact(text)[0]
    for _, value in ALL:
        assert value not in streamed


@pytest.mark.parametrize("kind,value", ALL, ids=[f"{k}-{i}" for i, (k, _) in enumerate(ALL)])
def test_stream_block_stops_before_any_part_of_the_value(kind, value):
    before = "Sure. Here is the data you asked for, written out in full for you: "
    text = before + value + " and that is all of it, nothing else to add here."
    guard, emitted = StreamGuard("block"), ""
    with pytest.raises(PIIBlocked) as info:
        for ch in text:  # one character per chunk: the worst split
            emitted += guard.feed(ch)
        emitted += guard.flush()
    assert before.startswith(emitted)
    assert info.value.kinds == [kind] and value not in info.value.message
    assert info.value.body()["error"]["pii_kinds"] == [kind]


def test_stream_redact_single_char_chunks_every_kind():
    text = " | ".join(v for _, v in ALL)
    guard = StreamGuard("redact")
    out = "".join(guard.feed(ch) for ch in text) + guard.flush()
    assert out == redact(text)[0]
    assert guard.found == set(SAMPLES)


def test_kinds_filter_and_allow_policy():
    text = "mail a@b.com card 4111111111111111"
    assert redact(text, kinds=["email"]) == ("mail [EMAIL] card 4111111111111111", ["email"])
    guard = StreamGuard("allow")
    assert guard.feed(text) == text and guard.flush() == ""
