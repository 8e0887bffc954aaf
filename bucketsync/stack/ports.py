"""The stack's addresses: everything listens on :data:`HOST`; is a port ours to take?

Owns the preflight port checks (free, and distinct across the stack's own settings), so that
``up`` fails before starting anything, naming the setting and its environment variable.
"""

from __future__ import annotations

import socket

from bucketsync.errors import UserError

HOST = "127.0.0.1"


def port_accepts(port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on ``HOST:port``."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_busy(port: int) -> bool:
    """True if the port is listened on or merely bound (a bind would fail)."""
    if port_accepts(port):
        return True
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
    except OSError:
        return True
    finally:
        sock.close()
    return False


def check_ports_free(ports: list[tuple[int, str]]) -> None:
    """``ports`` as ``(port, settings key)``; UserError naming the key for the first busy one."""
    for port, key in ports:
        if port_busy(port):
            raise UserError(
                f"port {port} is already in use by another process; "
                f"set stack.{key} / BUCKETSYNC_STACK__{key.upper()}"
            )


def check_ports_distinct(ports: list[tuple[int, str]]) -> None:
    """UserError if two settings of ``ports`` (``(port, settings key)``) name the same port."""
    seen: dict[int, str] = {}
    for port, key in ports:
        if port in seen:
            raise UserError(
                f"stack.{key} ({port}) collides with another stack port (stack.{seen[port]} is "
                f"{port} too); set them to two different ports"
            )
        seen[port] = key
