"""Grammar-constrained decoding on xgrammar: specs compiled once (thread-safe LRU), one matcher per sequence,
and each step's token masks for all constrained rows filled and applied together.

- Compiling: `Grammars.compile(spec)` validates a spec (structured.py, schema_check.py) and compiles it for
  this tokenizer; results are cached under the spec's canonical form and under its exact text (a repeat then
  skips validation too), so the engine's add_request after the replica's check_request costs a dict lookup.
  xgrammar's own cache is off (one cache, one bound). The tokenizer's xgrammar view (~0.3 s) is built on
  the first structured request, so engines that never see one pay nothing.
- Each step: `apply_masks(logits, seqs)` fills one bitmask row per constrained row (serially: on this 2-core
  CPU xgrammar's thread pool was slower for 16 rows, and a fill is ~4-10 us a row, too little to overlap with
  the forward pass) and applies them in one call (-inf outside the grammar) before the sampler. Greedy and
  sampled rows, penalties, top-k/top-p and seeds therefore all see only allowed tokens, and **logprobs of a
  constrained row are those of the masked distribution** (renormalised over the allowed tokens; disallowed
  tokens never appear in top_logprobs). Rows without a matcher are not touched.
- EOS is allowed only where the grammar accepts (the matcher's stop tokens are the engine's EOS ids); once it
  is accepted the matcher is terminated and the engine finishes the sequence with "stop".
- Preemption by recompute keeps a sequence's tokens, and its matcher has accepted exactly its output
  tokens, so a recomputed sequence resumes in the same grammar state: nothing needs replaying.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict

import torch

from serving.engine.errors import InvalidRequestError
from serving.engine.structured import normalize

log = logging.getLogger("loraplex.engine")
_CPP_PREFIX = re.compile(r"\[[\d:]+\] \S+?:\d+: (Check failed: \(.*?\) is false: )?")
_LOOSE_CHARS = '[^\\"\\\\\\r\\n]'  # xgrammar's characters of a length-bounded string: lets raw control characters in
_JSON_CHARS = '[^\\0-\\x1f\\"\\\\]'  # what JSON allows unescaped


def _library_message(exc: Exception) -> str:
    return _CPP_PREFIX.sub("", str(exc)).strip()


class Grammars:
    """The engine's grammar compiler and cache (compile may run on any thread; matchers stay on the engine's)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids, max_bytes: int = 65536, cache_size: int = 256):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self.max_bytes = max_bytes
        self.cache_size = cache_size
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler = None
        self._mask: torch.Tensor | None = None
        self.hits = self.misses = 0

    # ---- compiling ------------------------------------------------------------------------------------
    def _xgr_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.eos_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
            return self._compiler

    def compile(self, spec: dict):
        """A compiled grammar for `spec` (cached); InvalidRequestError naming the spec's param on any fault."""
        try:  # the spec's own text first: a repeat skips validation (jsonschema's check_schema takes ~ms)
            exact = "=" + json.dumps(spec, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError, RecursionError):
            exact = None
        hit = self._lookup(exact) if exact is not None and len(exact) <= self.max_bytes else None
        if hit is not None:
            return hit
        key, norm, params = normalize(spec, self.max_bytes)
        hit = self._lookup(key)
        if hit is None:
            hit = self._compile(norm, params)
            self.misses += 1
        self._store(key, hit)
        if exact is not None:
            self._store(exact, hit)
        return hit

    def _lookup(self, key: str):
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
            return hit

    def _store(self, key: str, compiled) -> None:
        with self._lock:
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > 2 * self.cache_size:  # two keys per spec: its own text and its canonical form
                self._cache.popitem(last=False)

    def _compile(self, norm: dict, params: dict):
        compiler = self._xgr_compiler()
        kind = norm["type"]
        try:
            if kind in ("json_schema", "json_object"):
                return compiler.compile_grammar(_json_grammar(norm.get("schema", {"type": "object"})))
            if kind == "regex":
                return compiler.compile_regex(norm["pattern"])
            if kind == "choice":
                return compiler.compile_grammar(
                    "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in norm["choices"]))
            if kind == "grammar":
                if norm["syntax"] == "lark":
                    return compiler.compile_lark(norm["grammar"])
                return compiler.compile_grammar(norm["grammar"])
            return compiler.compile_structural_tag({"type": "structural_tag", "format": _tool_format(norm, params)})
        except InvalidRequestError:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError subclasses with its parser's message
            param = params["schema"] if kind == "json_schema" else params["base"]
            what = {"json_schema": "the JSON schema", "regex": "the regex", "tool_calls": "the tool call grammar",
                    "grammar": f"the {norm.get('syntax')} grammar"}.get(kind, "the grammar")
            raise InvalidRequestError(f"{what} does not compile: {_library_message(exc)}", param=param) from None

    def matcher(self, spec: dict):
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compile(spec))

    def stats(self) -> dict:
        with self._lock:
            return {"grammar_cache_size": len(self._cache), "grammar_cache_hits": self.hits,
                    "grammar_cache_misses": self.misses}

    # ---- each step ------------------------------------------------------------------------------------
    def apply_masks(self, logits: torch.Tensor, seqs) -> None:
        """Mask `logits` [len(seqs), vocab] in place where seqs[i].matcher is set: one fill per such row, one
        apply for all of them."""
        rows = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if not rows:
            return
        import xgrammar as xgr

        if self._mask is None or self._mask.shape[0] < len(seqs):
            self._mask = xgr.allocate_token_bitmask(max(len(seqs), 16), self.vocab_size)
        mask = self._mask
        for i in rows:
            seqs[i].matcher.fill_next_token_bitmask(mask, i)
        if logits.device.type != "cpu":
            xgr.apply_token_bitmask_inplace(logits, mask[:len(seqs)].to(logits.device, non_blocking=True),
                                            vocab_size=self.vocab_size, indices=rows)
            return
        lo, hi = rows[0], rows[-1] + 1
        if hi - lo != len(rows):
            free = sorted(set(range(lo, hi)) - set(rows))
            mask[free] = -1  # unconstrained rows inside the span: nothing masked
        apply_bitmask_cpu(logits[lo:hi], mask[lo:hi])

    @staticmethod
    def accept(seq, token: int) -> bool:
        """Advance seq's matcher by its sampled token; False if the grammar refuses it (never for a masked
        sample)."""
        ok = seq.matcher.accept_token(token)
        if not ok:
            log.error("grammar refused sampled token %d of request %s", token, seq.request_id)
        return ok


def apply_bitmask_cpu(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """logits[i, t] = -inf where bit t of mask row i is 0. The inverted words unpack (numpy, C) straight into a
    bool "disallowed" tensor, so the logits see one masked_fill pass: 2.7x xgrammar's own CPU apply on this
    machine (1.8 vs 4.9 ms for 32 rows of 49152)."""
    import numpy as np

    disallowed = np.unpackbits((~mask.numpy()).view(np.uint8), axis=1, bitorder="little")[:, :logits.shape[1]]
    logits.masked_fill_(torch.from_numpy(disallowed).view(torch.bool), float("-inf"))


# Formats xgrammar 0.2.9 enforces too loosely, as exact patterns. `format: date` as the calendar has it (years
# 0001-9999, month lengths, Feb 29 in leap years only): xgrammar's date grammar takes any day 01-31 in any
# month, so "2024-11-31" got through (jsonschema's format check, as Python's date.fromisoformat, rejects it).
_YEAR = "([0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})"
_LEAP = "([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_MONTH_DAY = "((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)|02-(0[1-9]|1[0-9]|2[0-8]))"
DATE_PATTERN = f"^({_YEAR}-{_MONTH_DAY}|{_LEAP}-02-29)$"
# `format: ipv4` without leading zeros: xgrammar's took "86.76.86.048", which Python's ipaddress (jsonschema's
# check) refuses
_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
IPV4_PATTERN = f"^{_OCTET}(\\.{_OCTET}){{3}}$"
EXACT_FORMATS = {"date": DATE_PATTERN, "ipv4": IPV4_PATTERN}


def _exact_formats(node):
    """The schema with every format of EXACT_FORMATS replaced by its pattern (schema_check refuses pattern
    beside format, so there is never a pattern to merge with)."""
    if isinstance(node, list):
        return [_exact_formats(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _exact_formats(v) for k, v in node.items()}
    if out.get("format") in EXACT_FORMATS and "pattern" not in out:
        out["pattern"] = EXACT_FORMATS[out.pop("format")]
    return out


def _json_grammar(schema):
    """xgrammar's compact JSON grammar for a schema, with two fixes: exact dates and IPv4 addresses
    (EXACT_FORMATS), and in xgrammar 0.2.9 a string with minLength or maxLength takes any character but quote,
    backslash, CR and LF, so raw control characters (invalid JSON: a tiny model produced one) get through; those
    strings get JSON's own character class instead."""
    import xgrammar as xgr

    text = json.dumps(_exact_formats(schema))
    grammar = xgr.Grammar.from_json_schema(text, any_whitespace=False)
    if "Length" in text:  # the printed grammar is only re-parsed where such a string can be
        ebnf = str(grammar)
        if _LOOSE_CHARS in ebnf:
            grammar = xgr.Grammar.from_ebnf(ebnf.replace(_LOOSE_CHARS, _JSON_CHARS))
    return grammar


def _tool_format(norm: dict, params: dict) -> dict:
    """A tool_calls spec as an xgrammar structural tag. Each call's JSON is the same compact grammar as the
    json_schema kind (the structural tag's own JSON content would allow free whitespace)."""
    import xgrammar as xgr

    tags = []
    for tag, param in zip(norm["tags"], params["tags"]):
        try:
            ebnf = str(_json_grammar(tag["schema"]))
        except Exception as exc:
            raise InvalidRequestError(f"the JSON schema does not compile: {_library_message(exc)}",
                                      param=param) from None
        tags.append({"type": "tag", "begin": tag["begin"], "end": tag["end"],
                     "content": {"type": "grammar", "grammar": ebnf}})
    if norm["mode"] == "auto":
        return {"type": "triggered_tags", "triggers": norm["triggers"], "tags": tags,
                "stop_after_first": not norm["parallel"]}
    return {"type": "tags_with_separator", "tags": tags, "separator": norm["separator"], "at_least_one": True,
            "stop_after_first": not norm["parallel"]}
