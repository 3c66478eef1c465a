"""The catalog's gRPC servicer: validate the request into a command (``requests.py``, the
edge), call the use case, translate the answer back.

Domain errors become precise statuses in the shared rpc bootstrap (unary calls); the one
streaming call, ImportProducts, maps them itself with the same status details.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from services.kernel.errors import DomainError
from services.kernel.eventstore import EventStore
from services.kernel.rpc import STATUS_DETAILS_KEY, ServicerContext, status_of
from subsidy.v1 import catalog_pb2, catalog_pb2_grpc

from . import requests, sales
from .domain import Switches
from .handlers import Catalog
from .importer import import_products


def _ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _merchant(row: dict[str, Any]) -> catalog_pb2.Merchant:
    return catalog_pb2.Merchant(
        merchant_id=str(row["merchant_id"]),
        name=str(row["name"]),
        status=str(row["status"]),
        status_reason=str(row.get("status_reason") or ""),
    )


def _product(row: dict[str, Any]) -> catalog_pb2.Product:
    return catalog_pb2.Product(
        sku=row["sku"],
        merchant_id=row["merchant_id"],
        category=row["category"],
        grade=row["grade"],
        brand=row["brand"],
        model=row["model"],
        list_price_fen=row["list_price_fen"],
        status=row["status"],
        energy_label_code=row["energy_label_code"],
        baseline_fen=row.get("baseline_fen", 0),
    )


def _version(row: dict[str, Any]) -> catalog_pb2.PolicyVersion:
    return catalog_pb2.PolicyVersion(
        version=row["version"],
        status=row["status"],
        effective_from=_ts(row["effective_from"]),
        drafted_by=row["drafted_by"],
        draft_reason=row["draft_reason"],
        approved_by=row["approved_by"],
        approve_reason=row["approve_reason"],
        in_force=row["in_force"],
    )


def _switches(s: Switches) -> catalog_pb2.Switches:
    return catalog_pb2.Switches(
        campaign_paused=s.campaign is not None,
        campaign_reason=s.campaign.reason if s.campaign else "",
        paused_categories=[
            catalog_pb2.PausedCategory(
                category=code, reason=p.reason, actor_id=p.actor_id, since=_ts(p.since)
            )
            for code, p in sorted(s.categories.items())
        ],
    )


class CatalogApi(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    @property
    def store(self) -> EventStore:
        return self.catalog.store

    # -- policy ---------------------------------------------------------------------------
    async def GetPolicy(
        self, request: catalog_pb2.GetPolicyRequest, context: ServicerContext
    ) -> catalog_pb2.GetPolicyResponse:
        row = await self.catalog.policy_version(requests.policy_version(request.version))
        # The document as stored: canonical JSON, the same bytes the events carry.
        document = json.loads(row["document"])
        return catalog_pb2.GetPolicyResponse(
            version=row["version"],
            policy_json=json.dumps(document, sort_keys=True, ensure_ascii=False),
            status=row["status"],
            effective_from=_ts(row["effective_from"]),
            drafted_by=row["drafted_by"],
            approved_by=row["approved_by"],
        )

    async def ListPolicies(
        self, request: catalog_pb2.ListPoliciesRequest, context: ServicerContext
    ) -> catalog_pb2.ListPoliciesResponse:
        rows = await self.catalog.list_policies()
        return catalog_pb2.ListPoliciesResponse(versions=[_version(r) for r in rows])

    async def DraftPolicy(
        self, request: catalog_pb2.DraftPolicyRequest, context: ServicerContext
    ) -> catalog_pb2.PolicyVersion:
        row = await self.catalog.draft_policy(*requests.draft_policy(request))
        return _version(row)

    async def ApprovePolicy(
        self, request: catalog_pb2.ApprovePolicyRequest, context: ServicerContext
    ) -> catalog_pb2.PolicyVersion:
        row = await self.catalog.approve_policy(*requests.approve_policy(request))
        return _version(row)

    async def Quote(
        self, request: catalog_pb2.QuoteRequest, context: ServicerContext
    ) -> catalog_pb2.QuoteResponse:
        q = self.catalog.quote(requests.quote(request))
        return catalog_pb2.QuoteResponse(
            eligible=q.eligible,
            subsidy_fen=q.subsidy_fen,
            rate_bp=q.rate_bp,
            cap_fen=q.cap_fen,
            policy_version=q.policy_version,
            reasons=list(q.reasons),
        )

    # -- switches -------------------------------------------------------------------------
    async def PauseCategory(
        self, request: catalog_pb2.CategorySwitchRequest, context: ServicerContext
    ) -> catalog_pb2.Switches:
        return _switches(await self.catalog.pause_category(*requests.pause_category(request)))

    async def ResumeCategory(
        self, request: catalog_pb2.CategorySwitchRequest, context: ServicerContext
    ) -> catalog_pb2.Switches:
        return _switches(await self.catalog.resume_category(*requests.resume_category(request)))

    async def PauseCampaign(
        self, request: catalog_pb2.CampaignSwitchRequest, context: ServicerContext
    ) -> catalog_pb2.Switches:
        return _switches(await self.catalog.pause_campaign(*requests.pause_campaign(request)))

    async def ResumeCampaign(
        self, request: catalog_pb2.CampaignSwitchRequest, context: ServicerContext
    ) -> catalog_pb2.Switches:
        return _switches(await self.catalog.resume_campaign(*requests.resume_campaign(request)))

    async def GetSwitches(
        self, request: catalog_pb2.GetSwitchesRequest, context: ServicerContext
    ) -> catalog_pb2.Switches:
        return _switches(self.catalog.switches)

    # -- merchants ------------------------------------------------------------------------
    async def ApplyMerchant(
        self, request: catalog_pb2.ApplyMerchantRequest, context: ServicerContext
    ) -> catalog_pb2.Merchant:
        row = await self.catalog.apply_merchant(*requests.apply_merchant(request))
        return _merchant(row)

    async def ReviewMerchant(
        self, request: catalog_pb2.ReviewMerchantRequest, context: ServicerContext
    ) -> catalog_pb2.Merchant:
        row = await self.catalog.review_merchant(*requests.review_merchant(request))
        return _merchant(row)

    async def SuspendMerchant(
        self, request: catalog_pb2.MerchantActionRequest, context: ServicerContext
    ) -> catalog_pb2.Merchant:
        row = await self.catalog.suspend_merchant(*requests.suspend_merchant(request))
        return _merchant(row)

    async def ReinstateMerchant(
        self, request: catalog_pb2.MerchantActionRequest, context: ServicerContext
    ) -> catalog_pb2.Merchant:
        row = await self.catalog.reinstate_merchant(*requests.reinstate_merchant(request))
        return _merchant(row)

    async def GetMerchant(
        self, request: catalog_pb2.GetMerchantRequest, context: ServicerContext
    ) -> catalog_pb2.Merchant:
        return _merchant(await self.catalog.merchant(requests.merchant_id(request.merchant_id)))

    # -- products -------------------------------------------------------------------------
    async def RegisterProduct(
        self, request: catalog_pb2.RegisterProductRequest, context: ServicerContext
    ) -> catalog_pb2.Product:
        row = await self.catalog.register_product(*requests.register_product(request))
        return _product(row)

    async def UpdatePrice(
        self, request: catalog_pb2.UpdatePriceRequest, context: ServicerContext
    ) -> catalog_pb2.Product:
        row = await self.catalog.update_price(*requests.change_price(request))
        return _product(row)

    async def DelistProduct(
        self, request: catalog_pb2.DelistProductRequest, context: ServicerContext
    ) -> catalog_pb2.Product:
        return _product(await self.catalog.delist_product(*requests.delist(request)))

    async def GetProduct(
        self, request: catalog_pb2.GetProductRequest, context: ServicerContext
    ) -> catalog_pb2.Product:
        return _product(await self.catalog.product(requests.sku(request.sku)))

    async def GetPriceHistory(
        self, request: catalog_pb2.GetPriceHistoryRequest, context: ServicerContext
    ) -> catalog_pb2.PriceHistory:
        points, baseline, window = await self.catalog.price_history(requests.sku(request.sku))
        return catalog_pb2.PriceHistory(
            sku=request.sku,
            points=[
                catalog_pb2.PricePoint(
                    price_fen=p["price_fen"],
                    effective_at=_ts(p["effective_at"]),
                    reason=p["reason"],
                )
                for p in points
            ],
            baseline_fen=baseline,
            baseline_window_days=window,
        )

    async def ImportProducts(
        self, request: catalog_pb2.ImportProductsRequest, context: ServicerContext
    ) -> AsyncIterator[catalog_pb2.ImportProgress]:
        try:
            ctx = requests.import_products(request)
            async for p in import_products(
                self.catalog, request.csv, ctx, only_good_rows=request.only_good_rows
            ):
                message = catalog_pb2.ImportProgress(phase=p.phase, done=p.done, total=p.total)
                if p.result is not None:
                    r = p.result
                    message.result.CopyFrom(
                        catalog_pb2.ImportResult(
                            import_id=r.import_id,
                            outcome=r.outcome,
                            total_rows=r.total_rows,
                            applied=r.applied,
                            rejected=[
                                catalog_pb2.RowError(
                                    line=e.line, field=e.field, reason=e.reason, message=e.message
                                )
                                for e in r.rejected
                            ],
                            file_sha256=r.file_sha256,
                        )
                    )
                yield message
        except DomainError as err:
            code, message_text, status = status_of(err)
            await context.abort(
                code, message_text, trailing_metadata=((STATUS_DETAILS_KEY, status),)
            )

    # -- verification ---------------------------------------------------------------------
    async def VerifyItem(
        self, request: catalog_pb2.VerifyItemRequest, context: ServicerContext
    ) -> catalog_pb2.VerifyItemResponse:
        v = await self.catalog.verify_item(requests.verify_item(request))
        q = v.quote
        return catalog_pb2.VerifyItemResponse(
            eligible=v.eligible,
            reasons=list(v.reasons),
            category=v.category,
            grade=v.grade,
            rate_bp=q.rate_bp if q else 0,
            cap_fen=q.cap_fen if q else 0,
            subsidy_fen=v.subsidy_fen,
            policy_version=v.policy_version,
            merchant_id=v.merchant_id,
            baseline_fen=v.baseline_fen,
            price_limit_fen=v.price_limit_fen,
            serial_bound_order=v.serial_bound_order,
        )

    # -- sales ledger ---------------------------------------------------------------------
    async def GetSalesLedger(
        self, request: catalog_pb2.GetSalesLedgerRequest, context: ServicerContext
    ) -> catalog_pb2.SalesLedger:
        if request.merchant_id:
            await self.catalog.merchant(requests.merchant_id(request.merchant_id))
        rows = await sales.ledger_rows(self.store, request.merchant_id)
        return catalog_pb2.SalesLedger(
            rows=[
                catalog_pb2.SalesLedgerRow(
                    merchant_id=r.merchant_id,
                    sku=r.sku,
                    category=r.category,
                    brand=r.brand,
                    model=r.model,
                    sold_units=r.sold_units,
                    sales_fen=r.sales_fen,
                    subsidy_fen=r.subsidy_fen,
                    refunded_units=r.refunded_units,
                    refunded_sales_fen=r.refunded_sales_fen,
                    refunded_subsidy_fen=r.refunded_subsidy_fen,
                    net_units=r.net_units,
                    net_subsidy_fen=r.net_subsidy_fen,
                )
                for r in rows
            ],
            net_subsidy_fen=sum(r.net_subsidy_fen for r in rows),
        )

    async def ExportSalesLedger(
        self, request: catalog_pb2.ExportSalesLedgerRequest, context: ServicerContext
    ) -> catalog_pb2.ExportSalesLedgerResponse:
        sales.export([], request.format)  # validate the format before any work
        if request.merchant_id:
            await self.catalog.merchant(requests.merchant_id(request.merchant_id))
        rows = await sales.ledger_rows(self.store, request.merchant_id)
        content, content_type, filename = sales.export(rows, request.format)
        return catalog_pb2.ExportSalesLedgerResponse(
            content=content, content_type=content_type, filename=filename
        )
