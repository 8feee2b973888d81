"""Serving an emulator's HTTP server on a background thread, and stopping it so that the same
port can be listened on again ("the service went away, then came back")."""

from __future__ import annotations

import threading
from typing import Optional, Protocol


class _Server(Protocol):
    def serve_forever(self, poll_interval: float = ...) -> None: ...
    def shutdown(self) -> None: ...
    def server_close(self) -> None: ...


def serve_in_thread(server: _Server, name: str) -> threading.Thread:
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name=name
    )
    thread.start()
    return thread


def stop_serving(server: Optional[_Server], thread: Optional[threading.Thread]) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()
    if thread is not None:
        thread.join(timeout=5)
