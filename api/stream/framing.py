"""The Server-Sent Events wire format of the live stream: event frames, the opening `retry:` (with
the starting id of a new stream) and heartbeat comments."""

from __future__ import annotations

EVENT_STREAM_MEDIA_TYPE = "text/event-stream"
RETRY_MS = 3000
HEARTBEAT = b": heartbeat\n\n"


def event_frame(event_id: str, kind: str, data: str) -> bytes:
    """One event; `data` is a single line (the CloudEvent as compact JSON)."""
    return f"id: {event_id}\nevent: {kind}\ndata: {data}\n\n".encode()


def opening(start_id: str | None) -> bytes:
    """The first frame: the reconnection delay and, for a new stream, an id without data, which
    sets the client's last event id without an event: one that reconnects before its first event
    still resumes from there."""
    if start_id is None:
        return f"retry: {RETRY_MS}\n\n".encode()
    return f"retry: {RETRY_MS}\nid: {start_id}\n\n".encode()
