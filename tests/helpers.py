"""Small helpers shared by tests."""

from __future__ import annotations

import socket


def free_ports(count: int) -> list[int]:
    """Ports that are free right now on 127.0.0.1 (distinct)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
