"""Incremental detokenisation and stop strings.

Text is decoded over a short window of recent tokens (starting a few tokens before the new ones, so spacing
is right) and held back while it ends in an incomplete UTF-8 character (U+FFFD). Text that might be the start
of a stop string is held back too, so a stream never shows a stop string's first half.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool, stop: list[str],
                 include_stop: bool):
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop
        self.ids = list(prompt_ids[-5:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all generated text so far (after stop truncation)
        self.emitted = 0  # characters of self.text already returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add(self, token_id: int) -> str | None:
        """Add one generated token. Returns the stop string if one now appears in the text."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
            self.text += delta
            for s in self.stop:
                pos = self.text.find(s, start)
                if pos >= 0:
                    self.text = self.text[:pos + (len(s) if self.include_stop else 0)]
                    return s
        return None

    def flush_text(self, final: bool) -> str:
        """New text safe to show; on the final call, everything left."""
        end = len(self.text)
        if not final and self.stop:
            for s in self.stop:  # hold back a suffix that could still grow into a stop string
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        end = max(end, self.emitted)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
