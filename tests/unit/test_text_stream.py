"""Incremental detokenization with stop strings, on a toy tokenizer where each id is one string."""

from roofserve.llm.text import Coalescer, TextStream

VOCAB = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "\n", 6: "##", 7: "EN", 8: "D", 9: "?"}


def stream_text(tokens, decode, stop, max_tokens, prompt_tokens, scores=None):
    """TextStream over an iterator of tokens, as the API's step drives it: the deltas, then the end item."""
    stream = TextStream(decode, stop, max_tokens, prompt_tokens, scores)
    for token in tokens:
        yield from stream.push(token)
        if stream.stopped:
            break
    yield from stream.close()


def coalesce(items, every):
    """Coalescer over items that end with the end item (which sends what is held first)."""
    joiner = Coalescer(every)
    for item in items:
        yield from joiner.push(item)


def decode(ids):
    return "".join(VOCAB[i] for i in ids)


def run(tokens, stop=(), max_tokens=100):
    items = list(stream_text(tokens, decode, list(stop), max_tokens, prompt_tokens=3))
    text = "".join(i["text"] for i in items if i["t"] == "delta")
    return text, items[-1]


def test_all_text_arrives_and_usage_counts_tokens():
    text, end = run([1, 2, 3, 4])
    assert text == "Hello world"
    assert end == {"t": "end", "finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}


def test_max_tokens_reached_is_length():
    text, end = run([1, 2], max_tokens=2)
    assert text == "Hello" and end["finish_reason"] == "length"


def test_stop_string_cuts_text_and_generation():
    consumed = []

    def tokens():
        for t in [1, 2, 6, 7, 8, 3, 4]:
            consumed.append(t)
            yield t

    text, end = run(tokens(), stop=["##END"])
    assert text == "Hello"
    assert end["finish_reason"] == "stop"
    assert consumed == [1, 2, 6, 7, 8], "generation must stop at the stop string"


def test_partial_stop_prefix_is_held_back_then_released():
    items = list(stream_text([1, 6, 2], decode, ["##END"], 100, 0))
    deltas = [i["text"] for i in items if i["t"] == "delta"]
    assert "".join(deltas) == "Hel##lo"
    assert "Hel##" not in deltas[0], "'##' may start the stop string: it must wait for the next token"


def test_stop_string_spanning_tokens_is_found():
    text, _ = run([1, 2, 3, 6, 7, 8, 4], stop=["#EN"])
    assert text == "Hello wor#"


def test_incremental_text_equals_full_decode_on_the_real_tokenizer():
    from roofserve.llm.model import _load_tokenizer, bundled_gguf

    tok = _load_tokenizer(bundled_gguf())
    sample = "Héllo wörld! 你好, ça va? Emoji 🙂🚀 and\nnew lines,   spaces."
    ids = tok(sample, add_special_tokens=False)["input_ids"]
    def decode(x):
        return tok.decode(x, skip_special_tokens=True)
    items = list(stream_text(ids, decode, [], 1000, 0))
    assert "".join(i["text"] for i in items if i["t"] == "delta") == decode(ids)
    assert all("\ufffd" not in i["text"] for i in items if i["t"] == "delta")


def test_coalesce_sends_the_first_token_alone_then_groups_and_flushes_before_the_end():
    items = list(stream_text([1, 2, 3, 4, 5, 6], decode, [], 100, prompt_tokens=3))
    grouped = list(coalesce(items, 4))
    deltas = [i["text"] for i in grouped if i["t"] == "delta"]
    assert deltas == ["Hel", "lo world\n", "##"]
    assert grouped[-1] == items[-1]  # the end item, with usage, unchanged
    assert list(coalesce(items, 1)) == items


def scored(tokens):
    """What engine.scorer appends: (token, logprob, top pairs); logprob -i/10 tells the tokens apart."""
    return [(t, -i / 10, [(t, -i / 10), (9, -5.0)]) for i, t in enumerate(tokens)]


def test_logprob_entries_travel_with_the_text_of_their_tokens_through_the_coalescer():
    tokens = [1, 2, 6, 3, 4]
    items = list(coalesce(stream_text(tokens, decode, ["##END"], 100, 0, scored(tokens)), 2))
    deltas = [i for i in items if i["t"] == "delta"]
    assert "".join(d["text"] for d in deltas) == "Hello## world"
    entries = [e for d in deltas for e in d["logprobs"]]
    assert [(e["token"], e["logprob"]) for e in entries] == [("Hel", 0), ("lo", -0.1), ("##", -0.2), (" wor", -0.3), ("ld", -0.4)]
    assert entries[0]["top_logprobs"] == [{"token": "Hel", "logprob": 0, "bytes": list(b"Hel")},
                                          {"token": "?", "logprob": -5.0, "bytes": list(b"?")}]
    assert entries[2]["bytes"] == list(b"##")


def test_logprobs_of_tokens_cut_by_a_stop_string_still_arrive():
    tokens = [1, 2, 6, 7, 8]
    items = list(stream_text(tokens, decode, ["##END"], 100, 0, scored(tokens)))
    assert "".join(i["text"] for i in items if i["t"] == "delta") == "Hello"
    assert len([e for i in items if i["t"] == "delta" for e in i["logprobs"]]) == 5  # one per generated token
    assert items[-1]["usage"]["completion_tokens"] == 5


def test_each_delta_counts_its_tokens_and_the_coalescer_adds_them_up():
    items = list(coalesce(stream_text([1, 2, 6, 3, 4, 5], decode, ["##END"], 100, 0), 2))
    deltas = [i for i in items if i["t"] == "delta"]
    assert [d["tokens"] for d in deltas][0] == 1  # the first delta goes alone (time to first token)
    assert sum(d["tokens"] for d in deltas) == 6 == items[-1]["usage"]["completion_tokens"]
