"""The gRPC bootstrap's error mapping, on a real server and channel."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import empty_pb2

from services.kernel import authz, errors, rpc
from services.kernel.eventstore import WrongExpectedVersion
from services.kernel.identity import Caller, Role
from tests.conftest import Infra
from tests.support.callers import OPERATOR

METHOD = "/test.v1.Conflicts/Write"


async def write(request: empty_pb2.Empty, context: rpc.ServicerContext) -> empty_pb2.Empty:
    raise WrongExpectedVersion("budget-pool/p", 0, 1)


def register(servicer: object, server: grpc.aio.Server) -> None:
    handler = grpc.unary_unary_rpc_method_handler(
        write,
        request_deserializer=empty_pb2.Empty.FromString,
        response_serializer=empty_pb2.Empty.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.v1.Conflicts", {"Write": handler}),)
    )


@pytest.fixture
async def channel(infra: Infra) -> AsyncIterator[grpc.aio.Channel]:
    rules = {**authz.RULES, METHOD: frozenset({authz.OPERATOR})}
    server, _health = rpc.build_server([(register, None)], [], rules=rules)
    port = rpc.listen(server, "127.0.0.1:0", infra.identities(Caller(Role.SERVICE, "test")))
    await server.start()
    async with rpc.channel(f"127.0.0.1:{port}", infra.identities(OPERATOR)) as ch:
        yield ch
    await server.stop(grace=None)


async def test_a_version_conflict_is_aborted_and_retryable_never_internal(
    channel: grpc.aio.Channel,
) -> None:
    call = channel.unary_unary(
        METHOD,
        request_serializer=empty_pb2.Empty.SerializeToString,
        response_deserializer=empty_pb2.Empty.FromString,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(empty_pb2.Empty())
    err = caught.value
    assert err.code() == grpc.StatusCode.ABORTED
    info = rpc.error_info(err)
    assert info is not None and info.reason == "CONCURRENT_UPDATE"
    assert "budget-pool" not in (err.details() or "")  # no stream ids (they may name a person)
    # A peer's conflict stays a retryable conflict in the caller.
    mapped = rpc.as_domain_error(err, "ledger")
    assert isinstance(mapped, errors.Aborted) and mapped.reason == "CONCURRENT_UPDATE"
