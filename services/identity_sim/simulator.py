"""A SIMULATOR of the provincial identity authority's three-factor check.

It holds, in memory only, the records that `Enroll` gives it (the demo seed and the tests
enroll the people they generate) and answers `VerifyThreeFactors` as the real platform would.
It never logs what it is sent. Production points eligibility at the real platform's gateway.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import sys

import grpc

from services.kernel import rpc, tls
from services.kernel.rpc import ServicerContext
from services.kernel.settings import SettingsError, SimulatorSettings
from services.kernel.telemetry import configure_logging, configure_tracing
from subsidy.v1 import identity_pb2, identity_pb2_grpc

log = logging.getLogger(__name__)


def _key(id_number: str) -> str:
    # Records are keyed by a digest so even a memory dump holds no plain ID numbers as keys.
    return hashlib.sha256(id_number.strip().upper().encode()).hexdigest()


class IdentitySimulator(
    identity_pb2_grpc.IdentityAuthorityServicer, identity_pb2_grpc.IdentitySimulatorAdminServicer
):
    def __init__(self) -> None:
        self._records: dict[str, tuple[str, str]] = {}

    async def Enroll(
        self, request: identity_pb2.EnrollRequest, context: ServicerContext
    ) -> identity_pb2.EnrollResponse:
        self._records[_key(request.id_number)] = (request.name.strip(), request.phone.strip()[-11:])
        return identity_pb2.EnrollResponse()

    async def VerifyThreeFactors(
        self, request: identity_pb2.VerifyThreeFactorsRequest, context: ServicerContext
    ) -> identity_pb2.VerifyThreeFactorsResponse:
        record = self._records.get(_key(request.id_number))
        if record is None:
            return identity_pb2.VerifyThreeFactorsResponse(match=False, reason="NOT_FOUND")
        name, phone = record
        if name != request.name.strip():
            return identity_pb2.VerifyThreeFactorsResponse(match=False, reason="NAME_MISMATCH")
        if phone != request.phone.strip()[-11:]:
            return identity_pb2.VerifyThreeFactorsResponse(match=False, reason="PHONE_MISMATCH")
        return identity_pb2.VerifyThreeFactorsResponse(match=True, reason="MATCH")


SERVICE_NAMES = (
    identity_pb2.DESCRIPTOR.services_by_name["IdentityAuthority"].full_name,
    identity_pb2.DESCRIPTOR.services_by_name["IdentitySimulatorAdmin"].full_name,
)


async def start(listen: str, identity: tls.CertificateSource) -> tuple[grpc.aio.Server, int]:
    """Serve the simulator with mutual TLS on ``listen``; returns the server and its port."""
    sim = IdentitySimulator()
    server, health = rpc.build_server(
        [
            (identity_pb2_grpc.add_IdentityAuthorityServicer_to_server, sim),
            (identity_pb2_grpc.add_IdentitySimulatorAdminServicer_to_server, sim),
        ],
        SERVICE_NAMES,
    )
    port = rpc.listen(server, listen, identity)
    await server.start()
    await rpc.set_serving(health, SERVICE_NAMES)
    return server, port


def main() -> int:
    """Entry point of ``python -m services.identity_sim``: serve until SIGTERM/SIGINT."""
    try:
        settings = SimulatorSettings.from_env()
    except SettingsError as exc:
        print(f"identity_sim: {exc}", file=sys.stderr)
        return 2
    listen = settings.grpc_listen
    configure_logging("identity-sim", settings.log_level, settings.log_file)
    configure_tracing(
        "identity-sim",
        trace_file=settings.trace_file,
        service_name=settings.otel_service_name,
        traces_exporter=settings.otel_traces_exporter,
    )

    if settings.tls_source != "files" or settings.tls_dir is None:
        print(
            "identity_sim: the simulator reads its certificate from files: set"
            " SUBSIDY_TLS_SOURCE=files and SUBSIDY_TLS_DIR",
            file=sys.stderr,
        )
        return 2
    identity = tls.FileCertificates(settings.tls_dir)

    async def serve() -> None:
        server, port = await start(listen, identity)
        log.warning("identity authority SIMULATOR serving on port %d (not for production)", port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(grace=2.0)

    asyncio.run(serve())
    return 0
