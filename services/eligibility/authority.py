"""The identity authority: the provincial real-name platform, behind the adapter a real one uses.

It answers one question: do this name, ID number and phone belong together? The shipped
simulator (``services/identity_sim``) and a real platform's gateway both speak the same gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import grpc

from services.kernel.rpc import as_domain_error
from subsidy.v1 import identity_pb2, identity_pb2_grpc


@dataclass(frozen=True)
class Verdict:
    match: bool
    reason: str


class IdentityAuthority(Protocol):
    """The provincial real-name platform: does this name + ID number + phone belong together?"""

    async def verify(self, name: str, id_number: str, phone: str) -> Verdict: ...


class GrpcIdentityAuthority:
    """The adapter over gRPC; the shipped simulator and a real platform's gateway both fit."""

    def __init__(self, stub: identity_pb2_grpc.IdentityAuthorityAsyncStub) -> None:
        self._stub = stub

    async def verify(self, name: str, id_number: str, phone: str) -> Verdict:
        try:
            res = await self._stub.VerifyThreeFactors(
                identity_pb2.VerifyThreeFactorsRequest(name=name, id_number=id_number, phone=phone)
            )
        except grpc.aio.AioRpcError as err:
            raise as_domain_error(err, "identity_authority") from err
        return Verdict(res.match, res.reason)
