"""The funding rules of each policy version, as the ledger decides with them.

A reservation is split, capped and watched by the funding rules of the policy version its
subsidy was computed under (catalog names it in ``VerifyItem``); a funding is checked against
the sources of the version in force. The ledger asks catalog for a version's document once
(``GetPolicy``, over the call it already makes to catalog) and keeps it: an approved version
never changes, so the checkout's hot path pays a dictionary look-up.
"""

from __future__ import annotations

import grpc

from services.kernel.contract.policy import FundingRules, policy_from_json
from services.kernel.rpc import as_domain_error
from subsidy.v1 import catalog_pb2, catalog_pb2_grpc


class FundingPolicies:
    """Catalog's approved policy versions, reduced to their funding rules, cached by version."""

    def __init__(self, catalog: catalog_pb2_grpc.CatalogServiceAsyncStub) -> None:
        self.catalog = catalog
        self._rules: dict[str, FundingRules] = {}

    async def _fetch(self, version: str) -> tuple[str, FundingRules]:
        try:
            answer = await self.catalog.GetPolicy(catalog_pb2.GetPolicyRequest(version=version))
        except grpc.aio.AioRpcError as err:
            raise as_domain_error(err, "catalog") from err
        rules = policy_from_json(answer.policy_json).funding
        if answer.status == "APPROVED":  # a draft can still be replaced: never cached
            self._rules[answer.version] = rules
        return answer.version, rules

    async def rules(self, version: str) -> FundingRules:
        """The funding rules of the approved version ``version`` (an order's)."""
        found = self._rules.get(version)
        if found is not None:
            return found
        return (await self._fetch(version))[1]

    async def in_force(self) -> tuple[str, FundingRules]:
        """The version in force now (catalog decides which) and its funding rules."""
        return await self._fetch("")
