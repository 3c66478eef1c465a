"""The catalog's gRPC servicer."""

from __future__ import annotations

import json

import grpc

from services.kernel.errors import NotFound
from subsidy.v1 import catalog_pb2, catalog_pb2_grpc, common_pb2
from subsidy.v1 import events_pb2 as ev

from .handlers import Catalog
from .policy import policy_to_dict


def _operator(actor: common_pb2.Actor) -> common_pb2.Actor:
    return actor if actor.kind else common_pb2.Actor(kind=common_pb2.Actor.KIND_OPERATOR, id="unknown")


def _merchant(row: dict[str, object]) -> catalog_pb2.Merchant:
    return catalog_pb2.Merchant(
        merchant_id=str(row["merchant_id"]), name=str(row["name"]), status=str(row["status"])
    )


def _product(row: dict[str, object]) -> catalog_pb2.Product:
    return catalog_pb2.Product(**{k: row[k] for k in (  # type: ignore[arg-type]
        "sku", "merchant_id", "category", "grade", "brand", "model", "list_price_fen", "status"
    )})


class CatalogApi(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    async def GetPolicy(
        self, request: catalog_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.GetPolicyResponse:
        policy = self.catalog.policy(request.version)
        return catalog_pb2.GetPolicyResponse(
            version=policy.version,
            policy_json=json.dumps(policy_to_dict(policy), sort_keys=True, ensure_ascii=False),
        )

    async def Quote(
        self, request: catalog_pb2.QuoteRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.QuoteResponse:
        q = self.catalog.quote(
            request.category, request.grade, request.price_fen, request.policy_version
        )
        return catalog_pb2.QuoteResponse(
            eligible=q.eligible,
            subsidy_fen=q.subsidy_fen,
            rate_bp=q.rate_bp,
            cap_fen=q.cap_fen,
            policy_version=q.policy_version,
            reasons=list(q.reasons),
        )

    async def ApplyMerchant(
        self, request: catalog_pb2.ApplyMerchantRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.Merchant:
        row = await self.catalog.apply_merchant(
            request.merchant_id, request.name, request.licence_number, request.contact_phone,
            _operator(request.actor),
        )
        return _merchant(row)

    async def ReviewMerchant(
        self, request: catalog_pb2.ReviewMerchantRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.Merchant:
        row = await self.catalog.review_merchant(
            request.merchant_id, request.approve, request.reason, _operator(request.actor)
        )
        return _merchant(row)

    async def RegisterProduct(
        self, request: catalog_pb2.RegisterProductRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.Product:
        event = ev.ProductRegistered(
            sku=request.sku,
            merchant_id=request.merchant_id,
            category=request.category,
            grade=request.grade,
            brand=request.brand.strip(),
            model=request.model.strip(),
            energy_label_code=request.energy_label_code.strip(),
            list_price_fen=request.list_price_fen,
        )
        return _product(await self.catalog.register_product(event, _operator(request.actor)))

    async def GetProduct(
        self, request: catalog_pb2.GetProductRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.Product:
        row = await self.catalog.product(request.sku)
        if row is None:
            raise NotFound("UNKNOWN_SKU", f"sku: no product {request.sku!r}", field="sku")
        return _product(row)

    async def VerifyItem(
        self, request: catalog_pb2.VerifyItemRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.VerifyItemResponse:
        v = await self.catalog.verify_item(
            request.sku, request.unit_price_fen, request.serial, request.policy_version
        )
        q = v.quote
        return catalog_pb2.VerifyItemResponse(
            eligible=v.eligible,
            reasons=list(v.reasons),
            category=v.category,
            grade=v.grade,
            rate_bp=q.rate_bp if q else 0,
            cap_fen=q.cap_fen if q else 0,
            subsidy_fen=q.subsidy_fen if (q and v.eligible) else 0,
            policy_version=v.policy_version,
            merchant_id=v.merchant_id,
        )
