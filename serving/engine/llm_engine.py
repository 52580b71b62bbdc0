"""LLMEngine: requests in, one scheduler step at a time, RequestOutput deltas out (synchronous core)."""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field

import torch

from serving.engine.config import EngineConfig
from serving.identity import model_identity, system_fingerprint
from serving.engine.detokenizer import IncrementalDetokenizer
from serving.engine.errors import AdapterError, AdapterNotFoundError, ContextLengthExceededError, InvalidRequestError, ModelLoadError
from serving.engine.grammar import Grammars
from serving.engine.linear import cpu_path
from serving.engine.kv_cache import BlockAllocator
from serving.engine.loader import build_model, load_generation_eos
from serving.engine.model import ForwardBatch
from serving.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from serving.engine.sampler import sample
from serving.engine.sampling import SamplingParams
from serving.engine.scheduler import Scheduler, SchedulerOutput
from serving.engine.sequence import Sequence, Status

log = logging.getLogger("loraplex.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detoks: dict[int, IncrementalDetokenizer]  # by choice index
    pending_logprobs: list[list[TokenLogprob]] = field(default_factory=list)
    pending_ids: list[list[int]] = field(default_factory=list)
    reported: set[int] = field(default_factory=set)  # choices whose final output went out
    metrics: dict = field(default_factory=dict)


def auto_dtype(device: torch.device, quantization: str | None) -> torch.dtype:
    """`dtype: auto`: bfloat16 on CUDA, under quantization, and on CPUs where our bf16 kernels run in hardware
    (AVX512-BF16, or AVX2 + FMA), where it is 1.7x (32 streams) to 4x (one stream) faster than float32 with
    AVX512-BF16, 1.2x and 3.4x with AVX2, and its perplexity is within 0.3% of it (benchmarks/RESULTS.md);
    float32 elsewhere (bf16 would be emulated). float32 stays token-exact against HF transformers: ask for it
    with `dtype: float32`."""
    from serving.engine.linear import bf16_fast

    if device.type == "cuda" or quantization or (device.type == "cpu" and bf16_fast()):
        return torch.bfloat16
    return torch.float32


def apply_num_threads(config: EngineConfig) -> None:
    """Set torch's (and so our C kernels') CPU threads for the calling thread: OpenMP keeps the count per thread,
    so the engine thread calls this again (serving.engine.async_engine)."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        from transformers import AutoTokenizer

        import kernels

        self.config = config
        kernels.set_backend(config.kernels)
        apply_num_threads(config)
        self.device = pick_device(config.device)
        if self.device.type == "cpu":
            from serving.engine.host_memory import keep_freed_memory

            keep_freed_memory()
        dtype = DTYPES.get(config.dtype) or auto_dtype(self.device, config.quantization)
        self.dtype = dtype  # of the KV cache and adapter slots; CPU activations stay float32 (engine.linear)
        self.model, self.hf_config, self.model_path, ctx = build_model(
            config.model, config.load_format, dtype, self.device, config.max_model_len, config.quantization)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or self.model_path)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the tokenizer for {config.model!r}: {exc}") from exc
        self.eos_ids = load_generation_eos(self.model_path, self.hf_config, self.tokenizer)
        self.identity = model_identity(config.name, config.model, config.hf_id, config.aliases, str(self.model_path))
        self.grammars = Grammars(self.tokenizer, self.hf_config.vocab_size, self.eos_ids, config.max_grammar_bytes,
                                 config.grammar_cache_size)
        attn = self.model.layers[0].self_attn
        bytes_per_block = 2 * len(self.model.layers) * config.block_size * attn.num_kv_heads * attn.head_dim \
            * torch.finfo(dtype).bits // 8
        num_blocks = config.num_kv_blocks or max(1, config.kv_cache_bytes // bytes_per_block)
        if num_blocks * config.block_size < ctx:
            log.warning("KV cache holds %d tokens; capping max_model_len %d to it", num_blocks * config.block_size, ctx)
            ctx = num_blocks * config.block_size
        self.max_model_len = ctx
        if config.cuda_graphs and self.device.type != "cuda":
            raise ModelLoadError(f"cuda_graphs needs a CUDA device; this model runs on {self.device.type}")
        buckets = config.decode_buckets or config.cuda_graphs
        # with decode buckets, one more block than the allocator hands out takes the pad rows' K/V
        shape = (num_blocks + int(buckets), config.block_size, attn.num_kv_heads, attn.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=self.device),
                           torch.zeros(shape, dtype=dtype, device=self.device)) for _ in self.model.layers]
        log.info("kernels: %s; weights: %s; %d CPU threads", kernels.prepare(self.device, dtype),
                 cpu_path(dtype, config.quantization) if self.device.type == "cpu" else dtype, torch.get_num_threads())
        self.allocator = BlockAllocator(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.allocator, config.max_num_seqs, config.max_num_batched_tokens)
        self.buckets = None
        if buckets:
            from serving.engine.decode_buckets import DecodeBuckets

            self.buckets = DecodeBuckets(self.model, self.kv_caches, num_blocks, config.block_size,
                                         config.max_num_seqs, ctx, self.device, config.cuda_graphs)
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self.lora = None
        if config.enable_lora and config.max_loras > 0:
            from serving.engine.lora import LoRAManager

            lora_dtype = DTYPES.get(config.lora_dtype, dtype)
            if lora_dtype != dtype and kernels.backend_for(self.device) == "triton":
                raise ModelLoadError(f"lora_dtype {config.lora_dtype} differs from the model's {dtype}: the Triton "
                                     "LoRA kernels need them equal (use lora_dtype: auto)")
            self.lora = LoRAManager(self.model, config.max_loras, config.max_lora_rank, config.max_cpu_loras,
                                    self.identity, lora_dtype)
            self.scheduler.lora = self.lora
        self.total_prompt_tokens = 0
        self.total_generated_tokens = 0
        self.system_fingerprint = system_fingerprint(self.identity, {
            "source": config.model, "dtype": str(dtype), "lora_dtype": config.lora_dtype, "seed": config.seed,
            "quantization": config.quantization,
            "kernels": kernels.backend_for(self.device), "device": self.device.type})

    @property
    def name(self) -> str:
        return self.config.name

    # ---- requests -------------------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return list(prompt)

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Reject a request before any work: bad sampling values, empty or over-long prompts, structured-output
        specs that do not validate or compile (compiled here, cached for add_request)."""
        params.validate()
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab = self.hf_config.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        if params.top_k > vocab:
            raise InvalidRequestError(f"top_k must be at most the vocabulary size {vocab}", param="top_k")
        if any(t < 0 or t >= vocab for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
        total = len(prompt_ids) + (params.max_tokens or 1)
        if total > self.max_model_len:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{total} tokens ({len(prompt_ids)} in the prompt, {params.max_tokens or 1} for the completion). "
                "Please reduce the length of the prompt or max_tokens.")
        if params.structured is not None:
            self.grammars.compile(params.structured)

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                    lora_name: str | None = None, resume: dict[int, list[int]] | None = None) -> str:
        """Queue a request. `resume` (choice index -> output token ids already delivered) continues a request
        another replica started: only those choices run, each from its prompt plus its tokens (recomputed as a
        preempted sequence is, so the prefix cache makes it cheap); stop strings, the grammar and the
        detokenizer replay them, and seeded sampling continues exactly (the seed is per step: seed_for_step)."""
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running", param="request_id")
        prompt_ids = self.tokenize(prompt)
        self.check_request(prompt_ids, params)
        if lora_name and (self.lora is None or not self.lora.known(lora_name)):
            raise AdapterNotFoundError(f"The model '{self.name}:{lora_name}' does not exist: no adapter named "
                                       f"{lora_name!r} is loaded")
        if resume is not None:
            self._check_resume(resume, params, len(prompt_ids))
        seqs, detoks = [], {}
        base_seed = None if params.greedy else (params.seed if params.seed is not None else torch.seed() % 2**62)
        for i in range(params.n) if resume is None else sorted(resume):
            gen = None
            if base_seed is not None:
                gen = torch.Generator(device=self.device)
            matcher = self.grammars.matcher(params.structured) if params.structured is not None else None
            seq = Sequence(next(self._seq_ids), request_id, i, list(prompt_ids), len(prompt_ids), params,
                           lora_name=lora_name, generator=gen, matcher=matcher,
                           seed=None if base_seed is None else base_seed + i)
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens, params.stop,
                                           params.include_stop_str_in_output)
            if resume is not None:
                self._replay(seq, detok, resume[i])
            seqs.append(seq)
            detoks[i] = detok
            self.scheduler.add(seq)
        self.requests[request_id] = _Request(request_id, prompt_ids, params, seqs, detoks,
                                             [[] for _ in range(params.n)], [[] for _ in range(params.n)],
                                             metrics={"arrival": time.monotonic()})
        self.total_prompt_tokens += len(prompt_ids)
        return request_id

    def _check_resume(self, resume: dict[int, list[int]], params: SamplingParams, num_prompt: int) -> None:
        vocab = self.hf_config.vocab_size
        for i, ids in resume.items():
            if not isinstance(i, int) or not 0 <= i < params.n:
                raise InvalidRequestError(f"resume names choice {i!r}; the request has n={params.n}",
                                          param="resume")
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
                raise InvalidRequestError("resume holds token ids outside the vocabulary", param="resume")
            if (params.max_tokens is not None and len(ids) >= params.max_tokens) \
                    or num_prompt + len(ids) >= self.max_model_len:
                raise InvalidRequestError(f"choice {i} already reached its length; nothing to resume",
                                          param="resume")

    def _replay(self, seq: Sequence, detok: IncrementalDetokenizer, ids: list[int]) -> None:
        """Bring a resumed choice to where its first replica stopped; the text of those tokens was delivered."""
        for t in ids:
            if seq.matcher is not None and not seq.matcher.accept_token(t):
                raise InvalidRequestError("resume tokens do not fit the request's grammar", param="resume")
            seq.token_ids.append(t)
            detok.add(t)
        detok.flush_text(final=False)  # the same text the first replica had sent: not sent again

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        outs = []
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
            if seq.index not in req.reported:
                outs.append(CompletionOutput(seq.index, "", [], None, seq.finish_reason, seq.stop_reason,
                                             seq.num_output_tokens))
        return RequestOutput(request_id, req.prompt_ids, outs, True, metrics=req.metrics)

    # ---- adapters -------------------------------------------------------------------------------------
    def _lora(self):
        if self.lora is None:
            raise AdapterError("LoRA is disabled for this model (enable_lora: false)", param="model")
        return self.lora

    def add_lora(self, name: str, source: str, force: bool = False) -> None:
        """Load a PEFT adapter folder and make it servable as `name` (synchronous; see AsyncEngine.add_lora).
        `force` loads one whose declared base names another model (its shapes must still fit)."""
        manager = self._lora()
        manager.reserve(name, source, force)
        start = time.monotonic()
        try:
            weights = manager.load(name, source, force)
        except BaseException:
            manager.unregister(name)
            raise
        manager.register(weights, time.monotonic() - start)

    def remove_lora(self, name: str) -> None:
        if self.lora is None or name not in self.lora.info:
            raise AdapterNotFoundError(f"no adapter named {name!r} is loaded")
        self.lora.unregister(name)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step -------------------------------------------------------------------------------------
    def _build_batch(self, out: SchedulerOutput) -> ForwardBatch:
        bs = self.config.block_size
        ids, pos, slots, cu, pre_tables, pre_lens, logits_idx = [], [], [], [0], [], [], []
        for s in out.prefills:
            seq, start, end = s.seq, s.seq.num_computed_tokens, s.seq.num_computed_tokens + s.num_tokens
            ids += seq.token_ids[start:end]
            pos += range(start, end)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            cu.append(cu[-1] + s.num_tokens)
            pre_tables.append(table)
            pre_lens.append(end)
            if s.samples:
                logits_idx.append(len(ids) - 1)
        dec_tables, dec_lens = [], []
        for s in out.decodes:
            seq, p = s.seq, s.seq.num_tokens - 1
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
            dec_tables.append(seq.block_table)
            dec_lens.append(p + 1)
            logits_idx.append(len(ids) - 1)
        dev = self.device

        def table(rows):
            width = max((len(r) for r in rows), default=1)
            return torch.tensor([r + [0] * (width - len(r)) for r in rows] or [[0]], dtype=torch.int32, device=dev)

        long = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
        i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=dev)  # noqa: E731
        from_start = all(s.seq.num_computed_tokens == 0 for s in out.prefills)
        return ForwardBatch(long(ids), long(pos), long(slots), cu[-1], i32(cu), table(pre_tables), i32(pre_lens),
                            table(dec_tables), i32(dec_lens), long(logits_idx), prefill_from_start=from_start)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if out.empty:
            return []
        now = time.monotonic()
        sampled = [s.seq for s in out.prefills if s.samples] + [s.seq for s in out.decodes]
        for s in out.prefills + out.decodes:
            s.seq.first_scheduled_time = s.seq.first_scheduled_time or now
            req = self.requests.get(s.seq.request_id)
            if req is not None:
                req.metrics.setdefault("first_scheduled", now)
        lora_apply = None
        if self.lora is not None and self.lora.a:
            lora_apply = self.lora.prepare_batch(out)
        logits = self.buckets.run(out) if self.buckets is not None and lora_apply is None else None
        if logits is None:
            logits = self.model(self._build_batch(out), self.kv_caches, lora_apply)
        self.scheduler.after_step(out)
        if not sampled:
            return []
        self.grammars.apply_masks(logits, sampled)
        tokens, logprobs = sample(logits, sampled)
        touched: dict[str, _Request] = {}
        now = time.monotonic()
        for row, (seq, token) in enumerate(zip(sampled, tokens)):
            req = self.requests.get(seq.request_id)
            if req is None or seq.is_finished:
                continue
            if seq.matcher is not None and not self.grammars.accept(seq, token):
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
                touched[req.request_id] = req
                continue
            self._append_token(req, seq, token, logprobs[row] if seq.params.logprobs is not None else None)
            seq.first_token_time = seq.first_token_time or now
            req.metrics.setdefault("first_token", now)
            touched[req.request_id] = req
        return [self._make_output(req) for req in touched.values()]

    def _append_token(self, req: _Request, seq: Sequence, token: int, logprobs: torch.Tensor | None) -> None:
        seq.token_ids.append(token)
        self.total_generated_tokens += 1
        req.pending_ids[seq.index].append(token)
        p = seq.params
        if logprobs is not None:
            top = []
            if p.logprobs:
                vals, idx = logprobs.topk(p.logprobs)
                top = [(int(i), self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(vals, idx)]
            req.pending_logprobs[seq.index].append(
                TokenLogprob(token, self.tokenizer.decode([token]), float(logprobs[token]), top))
        detok = req.detoks[seq.index]
        # EOS is allowed only where a grammar accepts, and then ends it even with ignore_eos
        is_eos = (token in self.eos_ids and not p.ignore_eos) or (seq.matcher is not None
                                                                  and seq.matcher.is_terminated())
        if is_eos:
            seq.finish_reason = "stop"
        elif token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        else:
            hit = detok.add(token)
            if hit is not None:
                seq.finish_reason, seq.stop_reason = "stop", hit
            elif (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) \
                    or seq.num_tokens >= self.max_model_len:
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)

    def _make_output(self, req: _Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            detok = req.detoks[seq.index]
            if seq.index in req.reported:
                continue
            new_ids = req.pending_ids[seq.index]
            if not new_ids and not seq.is_finished:
                continue
            text = detok.flush_text(final=seq.is_finished)
            lps = req.pending_logprobs[seq.index] if seq.params.logprobs is not None else None
            outs.append(CompletionOutput(seq.index, text, new_ids, lps, seq.finish_reason, seq.stop_reason,
                                         seq.num_output_tokens))
            req.pending_ids[seq.index] = []
            req.pending_logprobs[seq.index] = []
            if seq.is_finished:
                req.reported.add(seq.index)
        finished = len(req.reported) == len(req.seqs)
        if finished:
            req.metrics["finished"] = time.monotonic()
            self.requests.pop(req.request_id, None)
        cached = req.seqs[0].num_cached_tokens if req.seqs else 0
        return RequestOutput(req.request_id, req.prompt_ids, outs, finished, cached, dict(req.metrics))

    # ---- convenience ----------------------------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams],
                 lora_names: list[str | None] | None = None) -> list[RequestOutput]:
        """Run prompts to completion; returns one RequestOutput per prompt with whole texts and token ids."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        lora_names = lora_names or [None] * len(prompts)
        ids = [self.add_request(p, sp, lora_name=ln) for p, sp, ln in zip(prompts, params_list, lora_names)]
        acc: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                merged = acc.setdefault(out.request_id, RequestOutput(out.request_id, out.prompt_token_ids, [], False))
                by_index = {o.index: o for o in merged.outputs}
                for o in out.outputs:
                    m = by_index.get(o.index)
                    if m is None:
                        m = CompletionOutput(o.index, "", [], [] if o.logprobs is not None else None)
                        merged.outputs.append(m)
                        by_index[o.index] = m
                    m.text += o.text
                    m.token_ids += o.token_ids
                    if o.logprobs is not None:
                        m.logprobs = (m.logprobs or []) + o.logprobs
                    m.finish_reason, m.stop_reason, m.num_generated = o.finish_reason, o.stop_reason, o.num_generated
                merged.finished = out.finished
                merged.num_cached_tokens = out.num_cached_tokens
                merged.metrics = out.metrics
        for merged in acc.values():
            merged.outputs.sort(key=lambda o: o.index)
        return [acc[i] for i in ids]

    def stats(self) -> dict:
        a = self.allocator
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_requests": len(self.requests),
            "kv_blocks_total": a.num_blocks,
            "kv_blocks_free": a.num_free,
            "kv_usage": a.usage(),
            "prefix_cache_queries": a.query_tokens,
            "prefix_cache_hits": a.hit_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens_total": self.total_prompt_tokens,
            "generation_tokens_total": self.total_generated_tokens,
            "max_num_seqs": self.config.max_num_seqs,
            "adapters": [{"name": i.name, "state": i.state, "rank": i.rank, "load_time_s": i.load_time_s,
                          "tokens": self.lora.tokens.get(i.name, 0)} for i in self.lora.list()] if self.lora else [],
        }
