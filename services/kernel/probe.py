"""The pod's health check: ``grpc.health.v1`` over mutual TLS with the pod's own certificate.

Kubernetes' native gRPC probes cannot present a client certificate, and every port is mutual
TLS only, so the chart runs this as an exec probe::

    python -m services.kernel.probe --addr 127.0.0.1:50051 --tls-dir /vault/secrets

It exits 0 only when the server answers SERVING (for ``--service``, or the whole server), and
1 otherwise: NOT_SERVING, no answer, a refused handshake, no usable certificate. The reason
goes to stderr, which the kubelet shows in the pod's events. The server's certificate must
name 127.0.0.1 (the chart's certificates do).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import rpc, tls


async def check(addr: str, tls_dir: Path, *, service: str = "", timeout_s: float = 3.0) -> str:
    """The health status ``addr`` reports for ``service`` ("" is the whole server), by name."""
    identity = tls.FileCertificates(tls_dir)
    async with rpc.channel(addr, identity, deadline_s=timeout_s) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
        )
    status: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run one check; 0 when SERVING, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m services.kernel.probe", description=__doc__)
    parser.add_argument("--addr", required=True, help="host:port, e.g. 127.0.0.1:50051")
    parser.add_argument("--tls-dir", required=True, type=Path, help="tls.crt, tls.key, ca.crt")
    parser.add_argument("--service", default="", help="a service name; default the server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds, default 3")
    args = parser.parse_args(argv)
    try:
        status = asyncio.run(
            check(args.addr, args.tls_dir, service=args.service, timeout_s=args.timeout)
        )
    except tls.TlsError as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return 1
    except grpc.aio.AioRpcError as exc:
        print(f"probe: {args.addr}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"probe: {args.addr} {args.service or '(server)'} is {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
