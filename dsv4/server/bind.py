"""bind_socket: take the server's address before the model loads, so a busy port fails at once.

``dsv4 serve`` binds its socket first and hands it to uvicorn (``Server.run(sockets=[sock])``)
once the engine is ready, rather than probing the port and binding again later: the address
that was checked is the one served, and nothing can take it in between, except a process
that itself sets SO_REUSEADDR and starts listening during the load (Linux lets two such sockets
share a port until one listens); uvicorn then reports the failed listen. The socket is bound but
not listening while the model loads, so clients get "connection refused" (not a hang) until the
server is ready. Options match uvicorn's own binding: SO_REUSEADDR (a restart is not refused
because of the previous run's TIME_WAIT connections), IPv6 when the host has a colon.
"""

from __future__ import annotations

import errno
import socket

__all__ = ["bind_socket"]


def bind_socket(host: str, port: int, prog: str = "dsv4 serve") -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening; SystemExit with one line naming
    the problem when the address cannot be had (port in use, no such address, privileged)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"{prog}: {_why(host, port, exc)}") from None
    except OverflowError:
        sock.close()
        raise SystemExit(f"{prog}: port {port} is not a TCP port (0-65535)") from None
    return sock


def _why(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"port {port} on {host} is already in use (another server?); stop it, or pick "
                "another with --port (--port 0: any free port)")
    if exc.errno == errno.EACCES:
        return (f"no permission to listen on port {port} of {host} (ports below 1024 need "
                "privileges); pick another with --port")
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        return f"cannot listen on {host}: not an address of this machine ({exc.strerror})"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
