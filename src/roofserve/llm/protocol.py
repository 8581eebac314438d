"""The OpenAI wire format of the LLM server: requests checked and normalised (chat, completions,
tokenize), and the response bodies and SSE chunks built from the worker's text items.

A field we do not implement is refused with a 400 that names it, unless it holds its neutral value
(`"presence_penalty": 0`, `"n": 1`, `"tools": []` ...), which several clients send on every request:
a request must never get a 200 as if a feature had worked.
"""

from __future__ import annotations

import json
import math
import secrets

from fastapi import HTTPException

from roofserve.config import LLMConfig
from roofserve.server.http import APIError, error_body, parse_json

ROLES = ("system", "user", "assistant")
# Fields that change nothing (informational), and fields we do not implement with the values that
# mean "off": anything else in them is a 400.
IGNORED = {"user", "metadata", "store", "service_tier"}
NEUTRAL = {"logit_bias": ({},), "tools": ([],), "tool_choice": ("none",),
           "parallel_tool_calls": (False, True), "response_format": ({"type": "text"},),
           "echo": (False,), "suffix": ("",), "best_of": (1,), "n": (1,)}
# sampling: OpenAI's fields, and vLLM's and llama-server's top_k, min_p and repetition_penalty
SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "seed"}
CHAT_FIELDS = {"messages", "model", "max_tokens", "max_completion_tokens", "stop", "stream", "stream_options",
               "ignore_eos", "logprobs", "top_logprobs", *SAMPLING_FIELDS}
COMPLETION_FIELDS = {"prompt", "model", "max_tokens", "stop", "stream", "stream_options", "ignore_eos", "logprobs",
                     *SAMPLING_FIELDS}
MAX_TOP_LOGPROBS = 20
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed takes
# No tokenizer we know has a token longer than this (SmolLM2's longest: 81 characters of spaces), so a
# longer prompt cannot fit the context: refused here, it is not tokenized in the worker between decode steps.
MAX_CHARS_PER_TOKEN = 128


def bad(message: str) -> HTTPException:
    return HTTPException(400, message)


def parse_body(body: bytes) -> object:
    """The request body as JSON, or a 400 that says why not."""
    try:
        return parse_json(body)
    except ValueError as e:
        raise bad(str(e)) from None


def check_fields(doc: dict, supported: set[str]) -> None:
    """400 naming every field that is neither supported, informational, nor at its neutral value."""
    refused = [key for key, value in doc.items()
               if key not in supported and key not in IGNORED
               and not (key in NEUTRAL and (value is None or value in NEUTRAL[key]))]
    if refused:
        raise bad(f"unsupported field{'s' if len(refused) > 1 else ''}: {', '.join(sorted(refused))} "
                  "(roofserve does not implement them; remove them from the request)")


def check_model(doc: dict, served: tuple[str, ...]) -> None:
    """OpenAI's 404 model_not_found for a model this server does not serve (absent or empty: the first)."""
    model = doc.get("model", "")
    if not isinstance(model, str):
        raise bad("'model' must be a string")
    if model and model not in served:
        raise APIError(404, f"The model `{model}` does not exist. This server serves: {', '.join(served)}",
                       "model_not_found")


def _number(doc: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = doc.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"'{key}' must be a number")
    if isinstance(value, float) and not math.isfinite(value):  # json takes NaN and Infinity literals
        raise bad(f"'{key}' must be a finite number, got {value}")
    if value > high or value < low or (low_open and value == low):
        raise bad(f"'{key}' must be in {'(' if low_open else '['}{low}, {high}], got {value}")
    return float(value)


def _text(value: str, where: str) -> str:
    """A string the tokenizer can take: json decodes a lone surrogate ("\\ud800"), which no UTF-8 holds."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"{where} holds a lone UTF-16 surrogate (not valid Unicode text)") from None
    return value


def _content(message: dict, index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return _text(content, f"messages[{index}].content")
    if isinstance(content, list):  # [{"type": "text", "text": "..."}, ...]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad(f"messages[{index}].content: only text parts are supported")
            parts.append(part["text"])
        return _text("".join(parts), f"messages[{index}].content")
    raise bad(f"messages[{index}].content must be a string or a list of text parts")


def check_messages(messages: object) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"messages[{i}] must be an object")
        if message.get("role") not in ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        clean.append({"role": message["role"], "content": _content(message, i)})
    return clean


def _common(doc: dict, cfg: LLMConfig) -> dict:
    """The sampling, limits and streaming fields chat and completions share."""
    max_tokens = doc.get("max_completion_tokens", doc.get("max_tokens"))
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise bad("'max_tokens' must be an integer")
        if not 1 <= max_tokens <= min(cfg.max_tokens_cap, cfg.max_seq_len):
            raise bad(f"'max_tokens' must be in [1, {min(cfg.max_tokens_cap, cfg.max_seq_len)}], got {max_tokens}")
    stop = doc.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop)):
        raise bad("'stop' must be a non-empty string or a list of up to 4 of them")
    for s in stop or []:
        _text(s, "'stop'")
    seed = doc.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("'seed' must be an integer")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise bad(f"'seed' must be a 64-bit integer, in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
    stream = doc.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be true or false")
    options = doc.get("stream_options")
    if options is not None:
        if not stream:
            raise bad("'stream_options' is only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"} or \
                not all(isinstance(v, bool) for v in options.values()):
            raise bad("'stream_options' supports only {\"include_usage\": true|false, "
                      "\"continuous_usage_stats\": true|false}")
    ignore_eos = doc.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad("'ignore_eos' must be true or false")
    top_k = doc.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1):
        raise bad("'top_k' must be an integer: the number of most likely tokens to sample from (0 or -1: all)")
    penalties = {key: _number(doc, key, 0.0, -2.0, 2.0) for key in ("presence_penalty", "frequency_penalty")}
    penalties["repetition_penalty"] = _number(doc, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True)
    if cfg.backend == "llamacpp":  # llama.cpp's penalties count the last 64 tokens of prompt and output
        for key, off in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
            if penalties[key] != off:
                raise bad(f"'{key}' is not available with the llamacpp backend")
    return {
        "max_tokens": max_tokens,
        "temperature": _number(doc, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(doc, "top_p", 1.0, 0.0, 1.0, low_open=True),
        "top_k": max(top_k or 0, 0),
        "min_p": _number(doc, "min_p", 0.0, 0.0, 1.0),
        **penalties,
        "seed": seed,
        "stop": stop or [],
        "stream": stream,
        "include_usage": bool(options and options.get("include_usage")),
        # vLLM's extension (GuideLLM sends it): usage so far in every chunk
        "continuous_usage": bool(options and options.get("continuous_usage_stats")),
        "ignore_eos": ignore_eos,
        "request_id": secrets.randbits(62) + 1,
    }


def _top_count(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise bad(f"'{key}' must be an integer in [0, {MAX_TOP_LOGPROBS}]")
    return value


def _logprobs(doc: dict, chat: bool, cfg: LLMConfig) -> int | None:
    """How many top alternatives each token's logprob entry lists, or None for no logprobs. Chat:
    `logprobs: true` with `top_logprobs` 0-20; completions: `logprobs` 0-20 (OpenAI's legacy shape)."""
    if chat:
        wanted, top = doc.get("logprobs"), doc.get("top_logprobs")
        if wanted is not None and not isinstance(wanted, bool):
            raise bad("'logprobs' must be true or false")
        count = None if top is None else _top_count(top, "top_logprobs")
        if not wanted:
            if count:
                raise bad("'top_logprobs' needs 'logprobs': true")
            return None
        count = count or 0
    else:
        count = None if doc.get("logprobs") is None else _top_count(doc["logprobs"], "logprobs")
    if count is not None and cfg.backend == "llamacpp":
        raise bad("'logprobs' is not available with the llamacpp backend")
    return count


def _request(doc: object, supported: set[str], served: tuple[str, ...]) -> dict:
    """A JSON object with only supported (or neutral) fields, for a model this server serves."""
    if not isinstance(doc, dict):
        raise bad("the body must be a JSON object")
    check_fields(doc, supported)
    check_model(doc, served)
    return doc


def validate_chat_request(doc: object, cfg: LLMConfig, served: tuple[str, ...]) -> dict:
    """POST /v1/chat/completions, checked and normalised; raises HTTPException(400/404) with what is wrong."""
    doc = _request(doc, CHAT_FIELDS, served)
    messages = check_messages(doc.get("messages"))
    _check_length(sum(len(m["content"]) for m in messages), cfg)
    return {"route": "chat", "messages": messages, **_common(doc, cfg), "logprobs": _logprobs(doc, True, cfg)}


def _check_length(chars: int, cfg: LLMConfig) -> None:
    if chars > cfg.max_seq_len * MAX_CHARS_PER_TOKEN:
        raise bad(f"the prompt has {chars} characters: far more than the context of {cfg.max_seq_len} tokens holds")


def _prompt(prompt: object) -> str | list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return _text(prompt, "'prompt'")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                   for t in prompt):
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise bad("one prompt per request: send the prompts as separate requests")
    raise bad("'prompt' must be a non-empty string or a list of token ids")


def validate_completion_request(doc: object, cfg: LLMConfig, served: tuple[str, ...]) -> dict:
    """POST /v1/completions, checked and normalised."""
    doc = _request(doc, COMPLETION_FIELDS, served)
    prompt = _prompt(doc.get("prompt"))
    if isinstance(prompt, str):
        _check_length(len(prompt), cfg)
    elif len(prompt) >= cfg.max_seq_len:
        raise bad(f"prompt has {len(prompt)} tokens: over the context of {cfg.max_seq_len} tokens")
    return {"route": "completions", "prompt": prompt, **_common(doc, cfg), "logprobs": _logprobs(doc, False, cfg)}


def validate_tokenize_request(doc: object, served: tuple[str, ...]) -> dict:
    """POST /tokenize in vLLM's shape: a prompt, or chat messages (through the chat template)."""
    doc = _request(doc, {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"}, served)
    if ("prompt" in doc) == ("messages" in doc):
        raise bad("send either 'prompt' or 'messages'")
    for flag in ("add_special_tokens", "add_generation_prompt"):
        if not isinstance(doc.get(flag, True), bool):
            raise bad(f"'{flag}' must be true or false")
    if "messages" in doc:
        return {"messages": check_messages(doc["messages"]), "add_generation_prompt": doc.get("add_generation_prompt", True)}
    if not isinstance(doc["prompt"], str):
        raise bad("'prompt' must be a string")
    return {"prompt": _text(doc["prompt"], "'prompt'"), "add_special_tokens": doc.get("add_special_tokens", True)}


def validate_detokenize_request(doc: object, served: tuple[str, ...], vocab_size: int) -> list[int]:
    doc = _request(doc, {"model", "tokens"}, served)
    tokens = doc.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise bad("'tokens' must be a list of token ids")
    if any(not 0 <= t < vocab_size for t in tokens):
        raise bad(f"token ids must be in [0, {vocab_size})")
    return tokens


class Formatter:
    """Response bodies and SSE events of one request, chat or completions, in OpenAI's shapes."""

    def __init__(self, payload: dict, model: str, created: int, extra: dict):
        self.chat = payload["route"] == "chat"
        prefix = "chatcmpl" if self.chat else "cmpl"
        self.base = {"id": f"{prefix}-{payload['request_id']:x}", "created": created, "model": model, **extra}
        self.include_usage = payload.get("include_usage", False)
        self.continuous_usage = payload.get("continuous_usage", False)
        self.prompt_tokens, self.completion_tokens = 0, 0  # for continuous usage
        self.scored = payload.get("logprobs") is not None
        self.offset = 0  # completions: characters of output before the next token (text_offset)
        self._plain: tuple[str, ...] | None = None  # a plain delta event around its JSON text (see delta)

    def _logprobs(self, entries: list[dict] | None) -> dict | None:
        """A choice's `logprobs`: chat's {"content": [entries]}, or completions' legacy parallel lists."""
        if not self.scored:
            return None
        entries = entries or []
        if self.chat:
            return {"content": entries}
        offsets = []
        for entry in entries:
            offsets.append(self.offset)
            self.offset += len(entry["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": offsets}

    def whole(self, text: str, finish_reason: str, usage: dict | None, entries: list[dict] | None = None) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
            if self.scored:
                choice["logprobs"] = self._logprobs(entries)
            return {**self.base, "object": "chat.completion", "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": self._logprobs(entries), "finish_reason": finish_reason}
        return {**self.base, "object": "text_completion", "choices": [choice], "usage": usage}

    def _event(self, choices: list, usage: dict | None = None) -> str:
        doc = {**self.base, "object": "chat.completion.chunk" if self.chat else "text_completion", "choices": choices}
        if usage is None and self.continuous_usage:
            usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                     "total_tokens": self.prompt_tokens + self.completion_tokens}
        if usage is not None:
            doc["usage"] = usage
        return f"data: {json.dumps(doc)}\n\n"

    def start(self) -> list[str]:
        return [self._event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])] \
            if self.chat else []

    def delta(self, text: str, entries: list[dict] | None = None, tokens: int = 0) -> str:
        self.completion_tokens += tokens
        if not self.scored and not self.continuous_usage:  # the usual event: only its text changes
            if self._plain is None:
                mark = "\x00text\x00"  # json writes it \u0000text\u0000, which no other field holds
                parts = self._event(self._delta_choices(mark)).split(json.dumps(mark))
                self._plain = (parts[0], parts[1]) if len(parts) == 2 else ()
            if self._plain:
                return f"{self._plain[0]}{json.dumps(text)}{self._plain[1]}"
        return self._event(self._delta_choices(text, entries))

    def _delta_choices(self, text: str, entries: list[dict] | None = None) -> list[dict]:
        if self.chat:
            choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
            if self.scored:
                choice["logprobs"] = self._logprobs(entries)
            return [choice]
        return [{"index": 0, "text": text, "logprobs": self._logprobs(entries), "finish_reason": None}]

    def end(self, finish_reason: str, usage: dict) -> list[str]:
        """The last chunk carries finish_reason and usage; with stream_options.include_usage, OpenAI's
        extra usage-only chunk (empty choices) follows."""
        choice = {"index": 0, "delta": {}, "finish_reason": finish_reason} if self.chat else \
            {"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}
        events = [self._event([choice], usage)]
        if self.include_usage:
            events.append(self._event([], usage))
        return events

    @staticmethod
    def error(status: int, message: str) -> str:
        return f"data: {json.dumps(error_body(status, message))}\n\n"
