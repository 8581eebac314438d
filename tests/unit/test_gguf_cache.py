"""The GGUF conversion cache: converted once per file, reused after, redone when the file changes."""

import os

from roofserve.llm.model import _converted


def test_a_gguf_is_converted_once_and_again_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("ROOFSERVE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF v1")
    calls = []

    def make(folder):
        calls.append(folder)
        (folder / "config.json").write_text("{}")

    first = _converted(gguf, "model", make)
    assert (first / "config.json").is_file() and first.name == "model" and len(calls) == 1
    assert _converted(gguf, "model", make) == first and len(calls) == 1, "reused"
    assert _converted(gguf, "tokenizer", make).parent == first.parent and len(calls) == 2
    gguf.write_bytes(b"GGUF v2, another size")
    os.utime(gguf, ns=(1, 1))
    assert _converted(gguf, "model", make) != first and len(calls) == 3, "a changed file is converted again"
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")], "no half-made folder left behind"


def test_an_unwritable_cache_falls_back_to_loading_directly(tmp_path, monkeypatch):
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    monkeypatch.setenv("ROOFSERVE_CACHE", str(blocked))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert _converted(gguf, "model", lambda folder: None) is None
