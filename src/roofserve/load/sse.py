"""An incremental parser for server-sent events (text/event-stream)."""

from __future__ import annotations


class SSEParser:
    """Feed raw bytes as they arrive; get back the `data` payload of each complete event.

    Handles events split across network chunks, CRLF or LF line ends, comment lines (": keep-alive"),
    fields other than data, and multi-line data (joined with newlines).
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        events = []
        while True:
            cut = self._buffer.find(b"\n")
            if cut < 0:
                return events
            line = self._buffer[:cut].rstrip(b"\r").decode("utf-8", errors="replace")
            self._buffer = self._buffer[cut + 1 :]
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith(":"):
                continue
            else:
                field, _, value = line.partition(":")
                if field == "data":
                    self._data.append(value[1:] if value.startswith(" ") else value)
