"""What a gateway sink is: the interface ``edge-alerts`` feeds every bridge through.

The gateway calls, from its own thread and in this order of guarantees:

* ``record(record, replayed)`` once per ``(run_id, frame_id)`` (de-duplicated and
  gap-recovered; a restarted gateway with ``--state`` does not repeat one). A sink that
  buffers must have stored the record durably before it returns.
* ``heartbeat(message)`` for every station heartbeat received.
* ``event(event)`` for each gateway event (``heartbeat_lost``, ``heartbeat_restored``,
  ``gap_unrecovered``, ``gap_too_large``): the same JSON objects as the output lines.
* ``poll()`` every loop turn (at least every ``POLL_MS``): timers, acknowledgements.
* ``close()`` once at exit.

Sinks must not block for long: the gateway's timers (heartbeat loss, replay) wait.
"""

from __future__ import annotations


class Sink:
    """Base class: every hook is a no-op."""

    name = "sink"

    def record(self, record: dict, replayed: bool) -> None:
        pass

    def heartbeat(self, message: dict) -> None:
        pass

    def event(self, event: dict) -> None:
        pass

    def poll(self) -> None:
        pass

    def close(self) -> None:
        pass


def decision_key(record: dict) -> str:
    """The de-duplication key every bridge puts in its payloads: ``"<run_id>/<frame_id>"``."""
    return f"{record['run_id']}/{record['frame_id']}"
