"""A free loopback port, for tools that must name a port before a server process starts.

In-process servers bind port 0 and read back what they got; this is for the cases that cannot
(a child process such as `imagemesh serve --port N`, a standalone Spark master). The port is
free when returned; another process could take it before the child binds it, which on a test
or bench machine is rare enough that callers simply fail and say so.
"""

from __future__ import annotations

import socket

__all__ = ["free_loopback_port"]


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
