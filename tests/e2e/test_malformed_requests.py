"""Request bytes that are not the method's message answer INVALID_ARGUMENT, quietly, on every RPC.

Every method of every service each server serves is enumerated from the protobuf descriptors
(a new RPC is covered without editing this test) and called over a raw channel with identity
serializers, by a caller the authorisation table lets call it, with bytes no request message
decodes. gRPC decodes a request before any interceptor's code runs, so this used to answer
UNKNOWN with the decoder's exception class in the message and a traceback at ERROR.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message_factory import GetMessageClass

from services.kernel import authz, rpc
from services.kernel.identity import Caller, Role
from subsidy.v1 import outbox_pb2
from tests.e2e.conftest import Platform

# Bytes no message parses: a tag with wire type 7 (there is none), a truncated length-delimited
# field, a truncated varint.
GARBAGE = (b"\xff\xff\xff\xff", b"\x0a\x7fab", b"\x08\xff")
NAMES = {Role.PLATFORM: "jd", Role.OPERATOR: "ops", Role.APPROVER: "checker"}
OUTBOX = outbox_pb2.DESCRIPTOR.services_by_name["OutboxService"].full_name


def allowed_caller(method: str) -> Caller:
    """One caller the authorisation table lets call ``method``."""
    principal = sorted(authz.RULES[method])[0]
    role, _, name = principal.partition("/")
    return Caller(Role(role), name or NAMES.get(Role(role), role))


def methods(platform: Platform) -> list[tuple[str, MethodDescriptor]]:
    """(service process, method) for every RPC of every service every process serves."""
    pool = descriptor_pool.Default()
    found = []
    for process, running in sorted(platform.running.items()):
        for full_name in (*running.wiring.service_names, OUTBOX):
            for m in pool.FindServiceByName(full_name).methods:
                found.append((process, m))
    return found


async def one(items: tuple[bytes, ...]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def call(channel: grpc.aio.Channel, m: MethodDescriptor, data: bytes) -> grpc.StatusCode:
    path = f"/{m.containing_service.full_name}/{m.name}"
    kind = (
        ("stream" if m.client_streaming else "unary")
        + "_"
        + ("stream" if m.server_streaming else "unary")
    )
    multi = getattr(channel, kind)(path)  # no serializers: the bytes go as they are
    try:
        if m.client_streaming and m.server_streaming:
            async for _ in multi(one((data,)), timeout=10):
                pass
        elif m.client_streaming:
            await multi(one((data,)), timeout=10)
        elif m.server_streaming:
            async for _ in multi(data, timeout=10):
                pass
        else:
            await multi(data, timeout=10)
    except grpc.aio.AioRpcError as err:
        info = rpc.error_info(err)
        assert info is not None and info.reason == "MALFORMED_REQUEST", (path, err)
        assert "Error" not in (err.details() or ""), err.details()  # no exception class
        return err.code()
    raise AssertionError(f"{path} accepted bytes its request cannot be")


async def test_garbage_bytes_on_every_rpc_answer_invalid_argument_quietly(
    platform: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    every = methods(platform)
    assert len(every) >= 39  # all the services' RPCs, as the issue counted them
    for _, m in every:
        request_type = GetMessageClass(m.input_type)
        for data in GARBAGE:
            with pytest.raises(Exception):  # noqa: B017 - the bytes really are malformed
                request_type.FromString(data)
    codes: dict[str, set[grpc.StatusCode]] = {}
    with caplog.at_level(logging.INFO):
        for process, m in every:
            path = f"/{m.containing_service.full_name}/{m.name}"
            who = allowed_caller(path)
            address = f"127.0.0.1:{platform.running[process].port}"
            async with rpc.channel(address, platform.infra.identities(who)) as channel:
                for data in GARBAGE:
                    codes.setdefault(path, set()).add(await call(channel, m, data))
    wrong = {p: c for p, c in codes.items() if c != {grpc.StatusCode.INVALID_ARGUMENT}}
    assert wrong == {}
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert loud == [], [r.getMessage() for r in loud]
    quiet = [r for r in caplog.records if "do not decode" in r.getMessage()]
    assert len(quiet) == len(every) * len(GARBAGE)  # one line a call
