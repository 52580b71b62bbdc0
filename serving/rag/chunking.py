"""Chunking by tokens with overlap, respecting headings and paragraphs.

A document is cut into sections at Markdown headings (HTML headings become Markdown ones in parsers.py); a chunk
never crosses a section. Inside a section, paragraphs are packed greedily up to `max_tokens`; a paragraph that
is too long is cut at sentence ends, and a sentence that is still too long into runs of `overlap` tokens. Each
new chunk repeats the last units of the previous one, up to `overlap` tokens. Chunks are exact slices of the
text: `text[start:end]`. A heading line that does not fit with the text after it is left out of the chunks
(each chunk carries its heading path, which is embedded with it).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from serving.rag.errors import InvalidInputError

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
_WORD = re.compile(r"\S+")

# (text) -> character spans of its tokens, in order.
TokenSpans = Callable[[str], Sequence[tuple[int, int]]]


@dataclass(frozen=True)
class Chunk:
    text: str
    start: int  # character offsets into the parsed document text
    end: int
    heading: str  # the heading path above the chunk ("Install > Linux"), "" before any heading
    tokens: int


def whitespace_spans(text: str) -> list[tuple[int, int]]:
    """Fallback tokenizer: one token per whitespace-separated word."""
    return [m.span() for m in _WORD.finditer(text)]


def tokenizer_spans(tokenizer) -> TokenSpans:
    """Token spans from a Hugging Face fast tokenizer (offset mapping, special tokens excluded)."""

    def spans(text: str) -> list[tuple[int, int]]:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [(a, b) for a, b in enc["offset_mapping"] if b > a]

    return spans


class _Counter:
    """Token counts of any char range from one tokenisation of the whole text (tokens starting in [a, b))."""

    def __init__(self, spans: Sequence[tuple[int, int]]):
        self.starts = [a for a, _ in spans]
        self.spans = spans

    def count(self, a: int, b: int) -> int:
        return bisect.bisect_left(self.starts, b) - bisect.bisect_left(self.starts, a)

    def pieces(self, a: int, b: int, size: int) -> list[tuple[int, int]]:
        """Cut [a, b) at token boundaries into runs of `size` tokens."""
        lo, hi = bisect.bisect_left(self.starts, a), bisect.bisect_left(self.starts, b)
        out = []
        for i in range(lo, hi, size):
            j = min(i + size, hi)
            start = a if i == lo else self.starts[i]
            end = b if j == hi else self.starts[j]
            out.append((start, end))
        return out


def _trim(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def _sections(text: str) -> list[tuple[int, int, str]]:
    """(start, end, heading path) per section; a section starts at its heading line."""
    bounds: list[tuple[int, str]] = [(0, "")]
    path: list[tuple[int, str]] = []
    for m in _HEADING.finditer(text):
        level, title = len(m.group(1)), m.group(2).strip()
        path = [(lv, t) for lv, t in path if lv < level] + [(level, title)]
        bounds.append((m.start(), " > ".join(t for _, t in path)))
    out = []
    for i, (start, heading) in enumerate(bounds):
        end = bounds[i + 1][0] if i + 1 < len(bounds) else len(text)
        out.append((start, end, heading))
    return out


def _units(text: str, a: int, b: int, counter: _Counter, max_tokens: int, piece: int) -> list[tuple[int, int]]:
    """Paragraphs of [a, b); too-long ones cut into sentences, too-long sentences into token runs."""
    units = []
    for para_start, para_end in _split(text, a, b, _PARAGRAPH_BREAK):
        if counter.count(para_start, para_end) <= max_tokens:
            units.append((para_start, para_end))
            continue
        for s_start, s_end in _split(text, para_start, para_end, _SENTENCE_END):
            if counter.count(s_start, s_end) <= max_tokens:
                units.append((s_start, s_end))
            else:
                units.extend(_trim(text, x, y) for x, y in counter.pieces(s_start, s_end, piece))
    return [(x, y) for x, y in units if y > x]


def _split(text: str, a: int, b: int, pattern: re.Pattern) -> list[tuple[int, int]]:
    out, pos = [], a
    for m in pattern.finditer(text, a, b):
        out.append(_trim(text, pos, m.start()))
        pos = m.end()
    out.append(_trim(text, pos, b))
    return [(x, y) for x, y in out if y > x]


def chunk_text(
    text: str,
    max_tokens: int = 200,
    overlap: int = 40,
    token_spans: TokenSpans | None = None,
) -> list[Chunk]:
    """Cut `text` into chunks of at most `max_tokens` tokens (by `token_spans`, default whitespace words)."""
    if max_tokens < 8:
        raise InvalidInputError(f"chunk_tokens must be at least 8, got {max_tokens}", param="chunk_tokens")
    if overlap < 0 or overlap * 2 > max_tokens:
        raise InvalidInputError(
            f"chunk_overlap must be between 0 and half of chunk_tokens ({max_tokens // 2}), got {overlap}",
            param="chunk_overlap",
        )
    counter = _Counter((token_spans or whitespace_spans)(text))
    piece = overlap if overlap > 0 else max_tokens
    chunks: list[Chunk] = []
    for sec_start, sec_end, heading in _sections(text):
        units = _units(text, sec_start, sec_end, counter, max_tokens, piece)
        if len(units) > 1 and _HEADING.fullmatch(text, units[0][0], units[0][1]):
            # A heading alone is no chunk: it joins the next unit, or (no room) lives on in `heading` only.
            if counter.count(units[0][0], units[1][1]) <= max_tokens:
                units[:2] = [(units[0][0], units[1][1])]
            else:
                units = units[1:]
        i = 0
        while i < len(units):
            first = i
            j = i + 1  # units[first:j] form the chunk
            while j < len(units) and counter.count(units[first][0], units[j][1]) <= max_tokens:
                j += 1
            start, end = units[first][0], units[j - 1][1]
            chunks.append(Chunk(text[start:end], start, end, heading, counter.count(start, end)))
            if j >= len(units):
                break
            # Overlap: step back over trailing units worth <= overlap tokens, always moving forward.
            nxt = j
            while nxt - 1 > first and counter.count(units[nxt - 1][0], end) <= overlap:
                nxt -= 1
            if nxt < j and counter.count(units[nxt][0], units[j][1]) > max_tokens:
                nxt = j  # the overlap would not leave room for the next unit
            i = nxt
    return chunks
