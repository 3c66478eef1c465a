"""Every service serves grpc.health.v1 and server reflection (operators and probes use them)."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.kernel import rpc
from tests.e2e.conftest import Platform
from tests.support.callers import OPERATOR

SERVICES = {
    "catalog": "subsidy.v1.CatalogService",
    "eligibility": "subsidy.v1.EligibilityService",
    "ledger": "subsidy.v1.LedgerService",
    "audit": "subsidy.v1.AuditService",
}


@pytest.mark.parametrize("name", sorted(SERVICES))
async def test_health_and_reflection(platform: Platform, name: str) -> None:
    address = f"127.0.0.1:{platform.running[name].port}"
    async with rpc.channel(address, platform.infra.identities(OPERATOR)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICES[name]):
            res = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert res.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        await call.done_writing()
        listed = {s.name async for r in call for s in r.list_services_response.service}
        assert {SERVICES[name], "grpc.health.v1.Health"} <= listed


@pytest.mark.parametrize("name", sorted(SERVICES))
async def test_a_plaintext_connection_is_refused(platform: Platform, name: str) -> None:
    """There is no plaintext port: a client without TLS cannot even reach health."""
    address = f"127.0.0.1:{platform.running[name].port}"
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=3
            )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
