"""systemd's sd_notify protocol: one datagram to $NOTIFY_SOCKET per state change.

A few lines of stdlib instead of a dependency. Without $NOTIFY_SOCKET (not started by systemd)
every call is a no-op, and a failed send is logged, never raised: the daemon must not die because
its supervisor went away.
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def _address(raw: str) -> str | bytes:
    # '@name' is a Linux abstract-namespace socket, spelled with a leading NUL byte.
    return b"\0" + raw[1:].encode() if raw.startswith("@") else raw


def notify(message: str, env: dict | None = None) -> bool:
    """Send e.g. "READY=1", "WATCHDOG=1", "STOPPING=1", "STATUS=..."; True if it was sent."""
    raw = (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not raw:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(_address(raw))
            s.sendall(message.encode())
        return True
    except OSError as e:
        log.warning("sd_notify %r to %s failed: %s", message, raw, e)
        return False


def watchdog_interval(env: dict | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half systemd's WatchdogSec), or None if no watchdog is set
    for this process."""
    env = env if env is not None else os.environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        return max(int(usec) / 2e6, 0.05)
    except ValueError:
        return None
