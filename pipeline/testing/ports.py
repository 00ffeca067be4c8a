"""Free TCP ports on loopback for the servers tests start (S3, a Ray head, the endpoint)."""
from __future__ import annotations

import socket


def free_ports(count: int, below: int = 60000) -> list[int]:
    """`count` distinct ports that are free now, all under `below`.

    The sockets stay bound until all are chosen, so one call never returns the same port twice. Servers
    that derive more ports from the ones given (SeaweedFS adds 10000 for gRPC) pass a lower bound.
    """
    sockets, ports = [], []
    try:
        while len(ports) < count:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port < below and port not in ports:
                ports.append(port)
            sockets.append(sock)
    finally:
        for sock in sockets:
            sock.close()
    return ports
