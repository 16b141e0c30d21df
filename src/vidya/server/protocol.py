"""The OpenAI request bodies we accept, validated strictly, and their translation to
`SamplingParams`. A field we do not implement is a 400 that names it, never silently ignored."""
from __future__ import annotations

import functools
import json
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from vidya.sampling_params import SamplingParams
from vidya.server.errors import APIError, bad_request

# Fields of the OpenAI API that this server knows but does not implement. Each may be sent with
# its "off" value (the openai client and some frameworks send those); anything else is a 400.
UNSUPPORTED_UNLESS = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "parallel_tool_calls": (None, False),
    "response_format": (None, {"type": "text"}), "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,),
    "suffix": (None, ""), "store": (None, False), "metadata": (None,), "service_tier": (None, "auto", "default"),
}
# vLLM's extra request fields that vidya knows but does not implement, with why: the same rule
# (the "off" value passes, anything else is a 400 naming the field and the reason).
STRUCTURED = "structured output (JSON schema, regex, choice, grammar) is not implemented yet"
VLLM_UNSUPPORTED_UNLESS = {
    "structured_outputs": ((None,), STRUCTURED), "guided_json": ((None,), STRUCTURED),
    "guided_regex": ((None,), STRUCTURED), "guided_choice": ((None,), STRUCTURED),
    "guided_grammar": ((None,), STRUCTURED), "guided_decoding_backend": ((None,), STRUCTURED),
    "guided_whitespace_pattern": ((None,), STRUCTURED),
    "use_beam_search": ((None, False), "beam search is not implemented"),
    "length_penalty": ((None, 1.0, 1), "length_penalty applies to beam search, which is not implemented"),
    "prompt_logprobs": ((None,), "prompt logprobs are not implemented"),
    "truncate_prompt_tokens": ((None,), "prompts are never truncated: a prompt too long is a 400"),
    "bad_words": ((None, []), "bad_words is not implemented; logit_bias -100 bans tokens"),
    "allowed_token_ids": ((None,), "allowed_token_ids is not implemented; logit_bias -100 bans tokens"),
    "logits_processors": ((None, []), "custom logits processors are not run by this server"),
    "return_tokens_as_token_ids": ((None, False), "logprob tokens are always text"),
    "spaces_between_special_tokens": ((None, True), "special tokens are always detokenized with spaces"),
    "continue_final_message": ((None, False), "continuing the final message is not implemented"),
    "chat_template": ((None,), "a per-request chat template is not accepted; start the server with --chat-template"),
    "documents": ((None,), "documents in the chat template are not implemented"),
    "priority": ((None, 0), "scheduling is first come first served; priorities are not implemented"),
    "cache_salt": ((None,), "cache salts are not implemented"),
}


# Bounds at the HTTP edge, as the OpenAI API has them where it states one (n, temperature, top_p,
# penalties, top_logprobs, stop, logit_bias), else generous ones that keep one request's memory and
# time small (the engine's Python API keeps vLLM's wider ranges). Each breach is a 400 naming the field.
MAX_N = 128
MAX_STOP = 4  # stop strings, as OpenAI
MAX_STOP_CHARS = 256  # each; a held-back stop costs its length squared per token
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300
MAX_MESSAGES = 2048
MAX_CONTENT_PARTS = 256
MAX_PROMPTS = 128  # prompts in one completions request
MAX_TOKEN_INT = 2**31 - 1  # max_tokens, min_tokens, top_k: the engine then checks them against the context
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_TEMPLATE_KWARGS = 16
MAX_DETOKENIZE = 1 << 20

Int = Annotated[int, Field(ge=0, le=MAX_TOKEN_INT)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


def _admits_none(annotation) -> bool:
    if annotation is type(None) or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _admits_none(typing.get_args(annotation)[0])
    return origin in (typing.Union, types.UnionType) and any(_admits_none(a) for a in typing.get_args(annotation))


@functools.cache
def _null_means_default(model: type) -> frozenset[str]:
    """The fields of `model` that have a default but no null value of their own."""
    return frozenset(name for name, f in model.model_fields.items()
                     if not f.is_required() and not _admits_none(f.annotation))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        """null for an optional field means its default, as OpenAI and vLLM read it (clients that
        serialise unset fields send `"n": null`, `"stream": null`, ...)."""
        if isinstance(data, dict):
            fields = _null_means_default(cls)
            if any(v is None and k in fields for k, v in data.items()):
                data = {k: v for k, v in data.items() if v is not None or k not in fields}
        return data


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # (vLLM's; refused when true: usage comes once, at the end)


class _Common(Strict):
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1, le=MAX_TOKEN_INT)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    min_tokens: Int = 0
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[Int], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    use_beam_search: Any = None
    length_penalty: Any = None
    prompt_logprobs: Any = None
    truncate_prompt_tokens: Any = None
    bad_words: Any = None
    allowed_token_ids: Any = None
    logits_processors: Any = None
    return_tokens_as_token_ids: Any = None
    spaces_between_special_tokens: Any = None
    priority: Any = None
    cache_salt: Any = None
    # known but not implemented: see UNSUPPORTED_UNLESS
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None

    def check_supported(self) -> None:
        for name, allowed in UNSUPPORTED_UNLESS.items():
            if name in type(self).model_fields and getattr(self, name) not in allowed:
                raise bad_request(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
        for name, (allowed, why) in VLLM_UNSUPPORTED_UNLESS.items():
            if name in type(self).model_fields and getattr(self, name) not in allowed:
                raise bad_request(f"'{name}' is not supported by this server: {why}", param=name,
                                  code="unsupported_parameter")
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            raise bad_request("'stream_options.continuous_usage_stats' is not supported by this server: usage "
                              "comes once, in the last chunk (include_usage)", param="stream_options.continuous_usage_stats",
                              code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        defaults: dict | None = None) -> SamplingParams:
        """`defaults`: what the fields this request leaves unset take (the model's
        generation_config.json, as vLLM's --generation-config auto), else OpenAI's."""
        d = defaults or {}
        unset = lambda value, name, fallback: d.get(name, fallback) if value is None else value  # noqa: E731
        bias = None
        if self.logit_bias:
            try:
                bias = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError:
                raise bad_request("logit_bias keys must be token ids (integers as strings)", param="logit_bias") from None
        try:
            return SamplingParams(
                n=self.n, temperature=unset(self.temperature, "temperature", 1.0),
                top_p=unset(self.top_p, "top_p", 1.0), top_k=unset(self.top_k, "top_k", 0),
                min_p=unset(self.min_p, "min_p", 0.0), presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=unset(self.repetition_penalty, "repetition_penalty", 1.0),
                seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens,
                stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
                stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
                include_stop_str_in_output=self.include_stop_str_in_output,
                logprobs=logprobs, logit_bias=bias, skip_special_tokens=self.skip_special_tokens)
        except ValueError as e:
            name = str(e).split(" ", 1)[0]
            raise bad_request(str(e), param=name if name in SamplingParams.__slots__ else None) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[dict], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            raise bad_request(f"messages[{index}].content is required", param=f"messages[{index}].content")
        parts = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise bad_request(f"messages[{index}].content[{j}]: only text parts "
                                  f"{{\"type\": \"text\", \"text\": \"...\"}} are supported",
                                  param=f"messages[{index}].content")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKEN_INT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKEN_INT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = Field(None, max_length=MAX_TEMPLATE_KWARGS)
    add_generation_prompt: bool = True  # (vLLM's: false leaves the assistant's turn unopened)
    continue_final_message: Any = None
    chat_template: Any = None
    documents: Any = None

    def conversation(self) -> list[dict]:
        out = []
        for i, m in enumerate(self.messages):
            role = "system" if m.role == "developer" else m.role
            out.append({"role": role, "content": m.text(i)})
        return out

    def requested_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Common):
    prompt: (str | Annotated[list[str], Field(max_length=MAX_PROMPTS)] | list[Int]
             | Annotated[list[list[Int]], Field(max_length=MAX_PROMPTS)])
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKEN_INT)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: Any = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of other than n is not supported by this server", param="best_of",
                              code="unsupported_parameter")
        if self.echo and self.logprobs is not None:
            raise bad_request("echo with logprobs (prompt logprobs) is not supported by this server",
                              param="echo", code="unsupported_parameter")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt must not be empty", param="prompt")
        if isinstance(p[0], int):
            return [p]
        return list(p)


DICT_FIELDS = ("logit_bias", "chat_template_kwargs")


def _param(loc: tuple) -> str | None:
    parts = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif any(c in part for c in "[]-") or part in ("str", "int", "float", "bool", "list", "dict"):
            break
        else:
            parts.append(("." if parts else "") + part)
            if part in DICT_FIELDS:  # what follows is the client's key: the field is the param
                break
    return "".join(parts) or None


def parse(model: type[Strict], raw: bytes):
    """Bytes of a request body -> a validated request object, or a 400 that says what is wrong."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {str(e)[:200]}") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    where = _lone_surrogate(data)
    if where is not None:
        raise bad_request("the request body holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape "
                          "without its pair): that is not Unicode text", param=where)
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_input=False, include_url=False)
        # a field of several forms (a string or a list, ...) fails once per form: the error that is
        # not a wrong form is the one that says what to fix (a list too long, a number out of range)
        err = next((x for x in errors if not x["type"].endswith("_type")), errors[0])
        param = _param(err["loc"])
        if err["type"] == "extra_forbidden":
            raise bad_request(f"unknown or unsupported field '{param}'", param=param,
                              code="unsupported_parameter") from None
        raise bad_request(f"{param}: {err['msg']}" if param else err["msg"], param=param) from None
    req.check_supported()
    return req


def _lone_surrogate(data) -> str | None:
    """The top-level field under which a string (or key) of the parsed body cannot be encoded
    as UTF-8 (JSON's \\ud800 escapes decode to lone surrogates), or None."""
    for field, value in data.items():
        stack = [field, value]
        while stack:
            x = stack.pop()
            if isinstance(x, str):
                if not x.isascii():
                    try:
                        x.encode("utf-8")
                    except UnicodeEncodeError:
                        return field.encode("utf-8", "backslashreplace").decode()  # (a key may be the culprit)
            elif isinstance(x, dict):
                stack.extend(x.keys())
                stack.extend(x.values())
            elif isinstance(x, list):
                stack.extend(x)
    return None


def require_json(content_type: str | None) -> None:
    if not content_type or content_type.split(";")[0].strip().lower() != "application/json":
        raise APIError(400, "Content-Type must be application/json", code="invalid_content_type")


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True

    def check_supported(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise bad_request("give exactly one of 'prompt' and 'messages'", param="prompt")


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: Annotated[list[int], Field(max_length=MAX_DETOKENIZE)]

    def check_supported(self) -> None:
        pass
