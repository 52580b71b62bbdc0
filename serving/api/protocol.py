"""OpenAI request models (chat, completions, embeddings) and their mapping to engine sampling parameters.

Field names, defaults and ranges follow OpenAI's API. Unknown fields are ignored (as vLLM does), so newer
clients keep working; known fields we cannot honour (functions, logit_bias, suffix, ...) are refused by name.
Tools (serving.api.tools) and output constraints (serving.api.structured) are validated here, so a bad one is a
400 naming its field before any replica is asked.
Bodies and chunks are plain dicts built by the endpoint modules (cheaper than pydantic on every stream chunk).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from serving.api.errors import APIError

MAX_N = 16
MAX_TOP_LOGPROBS = 20


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class StreamOptions(_Req):
    include_usage: bool = False


class ContentPart(_Req):
    type: str
    text: str | None = None


class ChatMessage(_Req):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: Any = None  # assistant calls in the history (checked by serving.api.tools.check_messages)
    tool_call_id: Any = None  # a tool message's answer to one of them


class _Sampling(_Req):
    """Fields shared by chat and completions (OpenAI's, plus vLLM-style extensions top_k/min_p/...)."""

    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1 - MAX_N)  # torch seeds are int64; +i per choice
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions (vLLM names)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    ignore_eos: bool = False
    _structured: Any = PrivateAttr(None)  # the output constraint, set by check() (serving.api.structured)

    @property
    def structured(self) -> dict | None:
        """The engine's structured-output spec of a checked request, else None."""
        return self._structured

    @property
    def json_output(self) -> bool:
        """Whether the output is constrained to JSON (output guards then redact inside string values only)."""
        return self._structured is not None and self._structured["type"] in ("json_schema", "json_object")

    def check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                           param="stream_options", code="invalid_value")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server.", param="logit_bias",
                           code="unsupported_parameter")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise APIError(400, "stop must be a non-empty string or a list of at most 16 non-empty strings.",
                           param="stop", code="invalid_value")

    def sampling_kwargs(self, max_tokens: int | None, logprobs: int | None) -> dict:
        """Keyword arguments for serving.engine.SamplingParams."""
        kw: dict[str, Any] = dict(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            max_tokens=max_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            logprobs=logprobs,
            ignore_eos=self.ignore_eos,
        )
        if self.top_k is not None:
            kw["top_k"] = self.top_k
        if self.min_p is not None:
            kw["min_p"] = self.min_p
        if self.repetition_penalty is not None:
            kw["repetition_penalty"] = self.repetition_penalty
        return kw

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: list[dict] | None = None
    response_format: Any = None
    structured_outputs: Any = None  # vLLM's extension: {"json"|"regex"|"choice"|"grammar"|"json_object": ...}
    _tools: Any = PrivateAttr(None)  # set by check()
    # extensions: grounded chat (serving.rag.grounding) and routing overrides (serving.router.headers);
    # typed Any here so their own parsers can name the field in a 400
    retrieval: Any = None
    route_policy: Any = None
    route_slo_ms: Any = None
    route_min_quality: Any = None

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check(self) -> None:
        self.check_common()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true.", param="top_logprobs",
                           code="invalid_value")
        if self.functions:
            raise APIError(400, "The legacy 'functions' field is not supported: use 'tools'.",
                           param="functions", code="unsupported_parameter")
        from serving.api.structured import request_spec
        from serving.api.tools import parse_tool_request

        tools = parse_tool_request(self.tools, self.tool_choice, self.parallel_tool_calls)
        self._tools = tools if tools is not None and tools.choice.mode != "none" else None
        self._structured = request_spec(self.response_format, self.structured_outputs)
        if self._tools is not None and self._structured is not None:
            raise APIError(400, "response_format (or structured_outputs) together with tools is not supported: "
                           "send one, or tool_choice none", param="response_format", code="unsupported_parameter")

    @property
    def tool_request(self):
        """serving.api.tools.ToolRequest of a checked request that may call tools, else None."""
        return self._tools



    def template_messages(self) -> list[dict]:
        """Messages as the chat template expects them: text content only, `developer` as `system`."""
        out = []
        for i, m in enumerate(self.messages):
            if isinstance(m.content, list):
                texts = []
                for j, part in enumerate(m.content):
                    if part.type != "text" or part.text is None:
                        raise APIError(400, f"Content parts of type {part.type!r} are not supported; "
                                       "this model takes text only.",
                                       param=f"messages[{i}].content[{j}].type", code="unsupported_content")
                    texts.append(part.text)
                content = "\n".join(texts)
            elif m.content is None:
                if m.role != "assistant":
                    raise APIError(400, f"messages[{i}].content is required for role {m.role!r}.",
                                   param=f"messages[{i}].content", code="invalid_value")
                content = ""
            else:
                content = m.content
            role = "system" if m.role == "developer" else m.role
            msg = {"role": role, "content": content}
            if m.name:
                msg["name"] = m.name
            if m.tool_calls is not None:
                msg["tool_calls"] = m.tool_calls
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            out.append(msg)
        from serving.api.tools import check_messages

        return check_messages(out)

    def to_sampling(self) -> dict:
        k = (self.top_logprobs or 0) if self.logprobs else None
        kw = self.sampling_kwargs(self.completion_limit(), k)
        if self.structured is not None:
            kw["structured"] = self.structured
        return kw


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    structured_outputs: Any = None  # vLLM's extension, as on chat
    response_format: Any = None  # accepted on completions too, as vLLM does

    def check(self) -> None:
        self.check_common()
        if self.suffix:
            raise APIError(400, "suffix is not supported: this server does not do fill-in-the-middle.",
                           param="suffix", code="unsupported_parameter")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of other than n is not supported.", param="best_of",
                           code="unsupported_parameter")
        if self.echo and self.logprobs is not None:
            raise APIError(400, "echo together with logprobs (prompt logprobs) is not supported.",
                           param="logprobs", code="unsupported_parameter")
        if self.stream and self.echo:
            raise APIError(400, "echo is not supported with stream.", param="echo", code="unsupported_parameter")
        from serving.api.structured import request_spec

        self._structured = request_spec(self.response_format, self.structured_outputs)

    def prompts(self) -> list[str | list[int]]:
        """One engine prompt per entry: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            prompts: list = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = list(p)
        if not prompts:
            raise APIError(400, "prompt must not be empty.", param="prompt", code="invalid_value")
        for i, one in enumerate(prompts):
            if (isinstance(one, str) and not one) or (isinstance(one, list) and not one):
                raise APIError(400, f"prompt[{i}] must not be empty.", param="prompt", code="invalid_value")
        return prompts

    def to_sampling(self) -> dict:
        kw = self.sampling_kwargs(self.max_tokens, self.logprobs)
        if self._structured is not None:
            kw["structured"] = self._structured
        return kw


class EmbeddingRequest(_Req):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _texts_only(cls, inp):
        if isinstance(inp, list) and inp and not all(isinstance(x, str) for x in inp):
            raise ValueError("token-id input is not supported by this server: send text")
        return inp

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if not texts:
            raise APIError(400, "input must not be empty.", param="input", code="invalid_value")
        for i, t in enumerate(texts):
            if not t:
                raise APIError(400, f"input[{i}] must be a non-empty string.", param="input", code="invalid_value")
        return texts


def split_model(model: str) -> tuple[str, str | None]:
    """'base:adapter' -> ('base', 'adapter'); 'base' -> ('base', None)."""
    base, sep, adapter = model.partition(":")
    return base, (adapter if sep and adapter else None)
