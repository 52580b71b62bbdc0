"""PII and secret detection: e-mail, phone, payment card (Luhn), IBAN (mod-97), national ids, API keys/secrets.

Regexes find candidates; checksums (Luhn, mod-97, SSN ranges, DNI letter) reject look-alikes. Overlapping
findings are merged into one span, so no fragment of a value survives redaction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

from serving.governance.config import PII_KINDS

PLACEHOLDER = {k: f"[{k.upper()}]" for k in PII_KINDS}
_PRIORITY = {"secret": 0, "iban": 1, "card": 2, "national_id": 3, "email": 4, "phone": 5}


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int


# --- validators: (match) -> end of the valid value, or None -------------------------------------------------

def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _digit_ends(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """(number of digits so far, end index after that digit) for each digit in text[start:end]."""
    out, n = [], 0
    for i in range(start, end):
        if text[i].isdigit():
            n += 1
            out.append((n, i + 1))
    return out


def _card(text: str, m: re.Match) -> int | None:
    digits = "".join(ch for ch in m.group(0) if ch.isdigit())
    for n, end in reversed(_digit_ends(text, m.start(), m.end())):  # longest valid prefix wins
        if 13 <= n <= 19 and luhn_ok(digits[:n]) and not (end < len(text) and text[end].isdigit()):
            return end
    return None


IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AT": 20, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "CH": 21, "CY": 28,
    "CZ": 24, "DE": 22, "DK": 18, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22,
    "GI": 23, "GL": 18, "GR": 27, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IS": 26, "IT": 27, "KW": 30,
    "KZ": 20, "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MT": 31, "NL": 18, "NO": 15,
    "PK": 24, "PL": 28, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24, "SI": 19, "SK": 24,
    "SM": 27, "TR": 26, "UA": 29,
}


def iban_ok(iban: str) -> bool:
    iban = iban.replace(" ", "").upper()
    if len(iban) < 15 or len(iban) > 34 or not iban.isalnum():
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _iban(text: str, m: re.Match) -> int | None:
    chars = [(ch, i + 1) for i, ch in enumerate(text[m.start():m.end()], m.start()) if ch != " "]
    compact = "".join(ch for ch, _ in chars)
    length = IBAN_LENGTHS.get(compact[:2])
    lengths = [length] if length else range(min(34, len(compact)), 14, -1)
    for n in lengths:
        if n <= len(compact) and iban_ok(compact[:n]):
            end = chars[n - 1][1]
            if end < len(text) and text[end].isalnum():
                continue
            return end
    return None


def _ssn(text: str, m: re.Match) -> int | None:
    area, group, serial = m.group("a"), m.group("g"), m.group("s")
    if area in ("000", "666") or area.startswith("9") or group == "00" or serial == "0000":
        return None
    if m.group(0) in _SSN_ADVERTISED:
        return None
    return m.end()


_SSN_ADVERTISED = ("078-05-1120", "457-55-5462", "219-09-9999")  # famous sample numbers, never issued
_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def _dni(text: str, m: re.Match) -> int | None:
    body = m.group("n")
    body = str("XYZ".index(body[0])) + body[1:] if body[0] in "XYZ" else body
    return m.end() if _DNI_LETTERS[int(body) % 23] == m.group("l") else None


def _nino(text: str, m: re.Match) -> int | None:
    return None if m.group(0)[:2] in ("BG", "GB", "NK", "KN", "TN", "NT", "ZZ") else m.end()


def _phone(text: str, m: re.Match) -> int | None:
    value = m.group(0)
    n = sum(ch.isdigit() for ch in value)
    if value.startswith(("+", "00")):
        return m.end() if 8 <= n <= 15 else None
    separators = sum(ch in " ().-" for ch in value)
    return m.end() if 10 <= n <= 11 and separators >= 1 else None


def _any(text: str, m: re.Match) -> int | None:
    return m.end()


_B = r"(?<![A-Za-z0-9])"  # not glued to a preceding word
_E = r"(?![A-Za-z0-9])"
DETECTORS: list[tuple[str, re.Pattern, Callable[[str, re.Match], int | None]]] = [
    ("email", re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*"
                         r"\.[A-Za-z]{2,24}(?![A-Za-z0-9-])"), _any),
    ("card", re.compile(r"(?<![0-9])\d(?:[ -]?\d){12,18}"), _card),
    ("iban", re.compile(_B + r"[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,34}"), _iban),
    ("national_id", re.compile(r"(?<![0-9-])(?P<a>\d{3})-(?P<g>\d{2})-(?P<s>\d{4})(?![0-9-])"), _ssn),  # US SSN
    ("national_id", re.compile(_B + r"[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]" + _E),
     _nino),  # UK National Insurance number
    ("national_id", re.compile(_B + r"(?P<n>\d{8}|[XYZ]\d{7})-?(?P<l>[A-Z])" + _E), _dni),  # Spanish DNI/NIE
    ("phone", re.compile(r"(?<![\w+])(?:\+|00)\d[\d ().-]{6,18}\d(?!\w)"), _phone),  # international
    ("phone", re.compile(r"(?<![\w+(])(?:\(\d{2,5}\) ?|\d{2,5}[ .-])\d{3,4}[ .-]?\d{3,4}(?!\w)"), _phone),  # national
    ("secret", re.compile(_B + r"(?:sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}|lpx-[A-Za-z0-9_-]{20,}"
                               r"|(?:AKIA|ASIA)[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}"
                               r"|xox[abprs]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35})"), _any),
    ("secret", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"), _any),
]
_OPEN_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")


def _raw_findings(text: str, kinds: Iterable[str]) -> list[Finding]:
    wanted = set(kinds)
    found = []
    for kind, pattern, validate in DETECTORS:
        if kind not in wanted:
            continue
        pos = 0
        while True:
            m = pattern.search(text, pos)
            if m is None:
                break
            end = validate(text, m)
            if end is None:
                pos = m.start() + 1  # a shorter value may start inside a rejected candidate
            else:
                found.append(Finding(kind, m.start(), end))
                pos = end
    return found


def scan(text: str, kinds: Iterable[str] = PII_KINDS) -> list[Finding]:
    """Non-overlapping findings in text order; overlapping candidates merge, keeping the stronger kind."""
    merged: list[Finding] = []
    for f in sorted(_raw_findings(text, kinds), key=lambda f: (f.start, -f.end)):
        if merged and f.start < merged[-1].end:
            last = merged[-1]
            kind = min(last.kind, f.kind, key=_PRIORITY.__getitem__)
            merged[-1] = Finding(kind, last.start, max(last.end, f.end))
        else:
            merged.append(f)
    return merged


def apply(text: str, findings: list[Finding]) -> str:
    out, pos = [], 0
    for f in findings:
        out.append(text[pos:f.start])
        out.append(PLACEHOLDER[f.kind])
        pos = f.end
    out.append(text[pos:])
    return "".join(out)


def redact(text: str, kinds: Iterable[str] = PII_KINDS) -> tuple[str, list[str]]:
    """-> (text with typed placeholders, sorted kinds found)."""
    findings = scan(text, kinds)
    return apply(text, findings), sorted({f.kind for f in findings})


class StreamGuard:
    """Checks streamed text: holds back a tail so a value split across chunks is never emitted in part.

    Emitted text ends only at whitespace outside any finding (or at a finding's start), at least `holdback`
    chars before the buffer end, so values without whitespace (e-mails, secrets) are never cut and values
    with spaces (cards, IBANs, phones: < 64 chars) are complete before the text around them goes out.
    """

    def __init__(self, action: str = "redact", kinds: Iterable[str] = PII_KINDS, holdback: int = 64,
                 max_hold: int = 8192, where: str = "output"):
        if action not in ("allow", "redact", "block"):
            raise ValueError(f"PII action must be allow, redact or block, got {action!r}")
        self.action, self.kinds, self.holdback, self.max_hold = action, tuple(kinds), holdback, max_hold
        self.where = where
        self.found: set[str] = set()
        self._buf = ""

    def _cut(self, findings: list[Finding]) -> int:
        buf = self._buf
        cut = len(buf) - self.holdback
        if cut <= 0:
            return 0
        while cut > 0 and not buf[cut - 1].isspace():  # never inside a run of non-space characters
            cut -= 1
        for f in findings:
            if f.start < cut < f.end:
                cut = f.start
        opened = _OPEN_PRIVATE_KEY.search(buf, 0, max(cut, 0) + 64)
        if opened and opened.start() < cut and not any(f.start == opened.start() for f in findings):
            cut = opened.start()  # an unterminated private key block: hold it all
        if cut == 0 and len(buf) > self.max_hold:
            cut = len(buf) - self.holdback  # a pathological unbroken run: emit rather than stall forever
        return cut

    def _emit(self, cut: int, findings: list[Finding]) -> str:
        head = [f for f in findings if f.end <= cut]
        self.found.update(f.kind for f in head)
        if head and self.action == "block":
            from serving.governance.errors import PIIBlocked

            raise PIIBlocked(self.where, sorted(self.found))
        text = apply(self._buf[:cut], head) if self.action == "redact" else self._buf[:cut]
        self._buf = self._buf[cut:]
        return text

    def feed(self, chunk: str) -> str:
        """Add a chunk; return the text now safe to send (maybe empty). Under `block`, raises PIIBlocked once a
        finding is settled (a growing value may change kind: a card's first digits look like a phone)."""
        if self.action == "allow":
            return chunk
        self._buf += chunk
        findings = scan(self._buf, self.kinds)
        return self._emit(self._cut(findings), findings)

    def flush(self) -> str:
        """The rest of the text at the end of the stream."""
        if self.action == "allow":
            return ""
        return self._emit(len(self._buf), scan(self._buf, self.kinds))
