"""Hypothesis strategies for the fuzz test's HTTP side: classes of bad
OpenAI JSON requests and bodies (see fuzz_strategies.py for the rest)."""

from __future__ import annotations

import json
import string
from typing import Any

from fuzz_strategies import (
    PROBE,
    PROMPT_KEYS,
    Bad,
    HttpCase,
    Strategy,
    Wire,
    cases,
    setting,
    short_text,
    too_many_tokens,
    valid_base,
    value_classes,
)
from hypothesis import strategies as st

# -- HTTP JSON -----------------------------------------------------------------------------

# fmt: off
KNOWN_HTTP_FIELDS = frozenset({
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "top_k", "min_p", "stop", "stop_token_ids", "ignore_eos", "seed", "stream",
    "n", "logprobs", "top_logprobs", "user", "stream_options", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "logit_bias", "speculative",
    "num_speculative_tokens", "echo", "best_of", "suffix", "response_format",
    "guided_json", "guided_regex", "guided_choice",
})
# fmt: on
not_a_number = st.one_of(
    st.text(max_size=8), st.lists(st.integers(), max_size=3), st.just({}), st.booleans()
)
not_an_int = not_a_number | st.floats(allow_nan=False, allow_infinity=False)
not_a_string = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.just({}))
not_a_bool = st.one_of(st.integers(), st.text(max_size=5), st.just([]))


def _wrong(fields: list[str], values: Strategy) -> Strategy:
    return st.builds(lambda name, value: Bad(name, {name: value}), st.sampled_from(fields), values)


def _not_int_list(value: Any) -> bool:
    return not (isinstance(value, list) and all(type(v) is int for v in value))


def http_only_classes(prompt: str) -> dict[str, Strategy]:
    """Bad settings JSON can carry and the typed gRPC API cannot."""
    return {
        "wrong JSON type": st.one_of(
            _wrong(["max_tokens", "top_k", "seed", "num_speculative_tokens", "n"], not_an_int),
            _wrong(["temperature", "top_p", "min_p", "presence_penalty"], not_a_number),
            _wrong(["ignore_eos", "stream", "speculative"], not_a_bool),
            _wrong(["stop"], not_a_string | st.lists(not_a_string, min_size=1)),
            _wrong(["stop_token_ids"], not_a_number.filter(_not_int_list)),
            _wrong(["user", "model"], not_a_string),
            _wrong([prompt], not_a_string | st.none()),
        ),
        "unknown field": st.text(string.ascii_lowercase + "_", min_size=1, max_size=12)
        .filter(lambda name: name not in KNOWN_HTTP_FIELDS)
        .map(lambda name: Bad(name, {name: 1})),
        "unsupported parameter (n, logprobs, penalties, logit_bias)": st.one_of(
            setting("n", st.integers(2, 10)),
            setting("logprobs", st.just(True)),
            setting("presence_penalty", st.floats(0.1, 2)),
            setting("frequency_penalty", st.floats(0.1, 2)),
            setting("logit_bias", st.just({"5": 100.0})),
        ),
        "unknown model (404)": setting("model", st.text(max_size=10).map(lambda m: f"not-{m}")),
        "integer past 64 bits or negative (seed, top_k, max_tokens)": st.one_of(
            setting("seed", st.integers(-(2**70), -1) | st.integers(2**64, 2**80)),
            setting("top_k", st.integers(-(2**40), -1)),
            setting("max_tokens", st.integers(10**20, 10**30)),
        ),
        "lone surrogate in a string": setting("stop", st.just(["ok", "\ud800"])),
    }


def completion_classes() -> dict[str, Strategy]:
    classes = value_classes("prompt", "prompt", 2**40) | http_only_classes("prompt")
    del classes["request_id too long, unprintable or padded"]  # HTTP has no request_id
    classes["lone surrogate in a string"] |= setting("prompt", st.just("a \udfff b"))
    classes["unsupported parameter (echo, best_of, suffix, batches)"] = st.one_of(
        setting("echo", st.just(True)),
        setting("best_of", st.integers(2, 5)),
        setting("suffix", short_text),
        setting("prompt", st.just([[1, 2], [3]]) | st.just(["a", "b"])),
    )
    base = valid_base("prompt", "prompt")
    return {kind: cases(base, bad) for kind, bad in classes.items()}


def chat_classes() -> dict[str, Strategy]:
    """Chat's prompt is ``messages``; prompt-length classes go through it."""
    message = st.fixed_dictionaries({"role": st.just("user"), "content": short_text})
    base = st.builds(
        lambda messages, fields: {"messages": messages} | fields,
        st.lists(message, min_size=1, max_size=3),
        valid_base().map(lambda f: {k: v for k, v in f.items() if k not in PROMPT_KEYS}),
    )
    kept = value_classes("text", "token_ids", 2**40)
    classes = {kind: bad for kind, bad in kept.items() if kind in CHAT_VALUE_CLASSES}
    classes |= http_only_classes("messages")
    user = [{"role": "user", "content": "hi"}]
    classes["messages: empty, not a list, bad role, non-text part, unknown key"] = setting(
        "messages",
        st.one_of(
            st.sampled_from(
                [
                    [],
                    "hello",
                    [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
                    [{"role": "user", "content": "hi", "tool_calls": []}],
                    [{"content": "no role"}],
                ]
            ),
            st.lists(st.fixed_dictionaries({"role": not_a_string}), min_size=1, max_size=2),
        ),
    )
    classes["text over the context (tokens)"] = setting(
        "messages", too_many_tokens.map(lambda text: [{"role": "user", "content": text}])
    )
    classes["unsupported parameter (top_logprobs)"] = setting("top_logprobs", st.integers(1, 5))
    classes["structured output that does not compile"] = st.one_of(
        setting("guided_regex", st.sampled_from(["[0-9", "(a", "a{2,1}"])),
        setting("guided_choice", st.just([])),
        setting("guided_json", st.sampled_from(['{"type": 5}', "{not json"])),
    )
    classes["lone surrogate in a string"] |= setting(
        "messages", st.just([{"role": "user", "content": "\ud800"}, *user])
    )
    return {kind: cases(base, bad) for kind, bad in classes.items()}


# value_classes rows that do not name the prompt (chat's prompt is `messages`)
CHAT_VALUE_CLASSES = frozenset(
    {
        "temperature NaN, inf or negative",
        "top_p NaN, <= 0 or > 1",
        "min_p NaN, < 0 or > 1",
        "top_k above the vocabulary",
        "max_tokens 0 or over the limit (up to huge)",
        "num_speculative_tokens 0, over k, or with speculation off",
        "stop: too many, empty or too long",
        "stop_token_ids: too many or >= vocabulary size",
    }
)


def http_value_classes() -> dict[str, Strategy]:
    """Each class over both endpoints where both have it."""
    merged: dict[str, Strategy] = {}
    for path, classes in (
        ("/v1/completions", completion_classes()),
        ("/v1/chat/completions", chat_classes()),
    ):
        for kind, strategy in classes.items():
            routed = strategy.map(lambda case, path=path: HttpCase(path, case))
            merged[kind] = merged[kind] | routed if kind in merged else routed
    return merged


# -- HTTP bodies ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
VALID_BODY = json.dumps({"prompt": PROBE, "max_tokens": 4}).encode()


def body_classes() -> dict[str, Strategy]:
    """Bodies that are not a request object at all (``named``: the field the
    refusal must name, where there is one)."""
    return {
        "body: random bytes": st.binary(max_size=100).map(Wire),
        "body: JSON but not an object": json_values.filter(lambda v: not isinstance(v, dict)).map(
            lambda value: Wire(json.dumps(value).encode())
        ),
        "body: object without the prompt": st.dictionaries(
            st.sampled_from(["max_tokens", "temperature", "top_k"]), st.integers(1, 4)
        ).map(lambda fields: Wire(json.dumps(fields).encode(), "prompt")),
        "body: valid JSON cut short": st.integers(1, len(VALID_BODY) - 1).map(
            lambda cut: Wire(VALID_BODY[:cut])
        ),
    }
