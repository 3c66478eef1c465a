"""Products: registered LISTED with a first list price, repriced, delisted for good.

One product is one ``product/{sku}`` stream, whether it was registered alone or imported
with thousands of others: both go through :func:`register_product`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from google.protobuf.message import Message

from services.kernel.contract.policy import Policy
from services.kernel.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from subsidy.v1 import events_pb2 as ev

from .common import DELISTED, LISTED
from .merchant import unknown_merchant


@dataclass(frozen=True)
class Product:
    sku: str
    merchant_id: str
    category: str
    grade: int  # 0 = no efficiency grade
    brand: str
    model: str
    energy_label_code: str
    list_price_fen: int
    status: str


@dataclass(frozen=True)
class RegisterProduct:
    """A registration whose fields are well-formed (checked at the edge)."""

    sku: str
    merchant_id: str
    category: str
    grade: int
    brand: str
    model: str
    energy_label_code: str
    list_price_fen: int


@dataclass(frozen=True)
class ChangePrice:
    sku: str
    list_price_fen: int
    reason: str


@dataclass(frozen=True)
class Delist:
    sku: str
    reason: str


def unknown_sku(sku: str) -> NotFound:
    return NotFound("UNKNOWN_SKU", f"sku: no product {sku!r}", field="sku")


def register_product(
    state: Product | None, command: RegisterProduct, policy: Policy, merchant_known: bool
) -> list[Message]:
    """A product of a category the policy in force subsidises, sold by a merchant who has
    applied (approval is checked when an item is verified), registered once."""
    if policy.category(command.category) is None:
        raise InvalidArgument(
            "UNKNOWN_CATEGORY", "category: not a category of the policy in force", field="category"
        )
    if not merchant_known:
        raise unknown_merchant(command.merchant_id)
    if state is not None:
        raise AlreadyExists(
            "PRODUCT_EXISTS", f"sku: {command.sku} is registered already", field="sku"
        )
    return [
        ev.ProductRegistered(
            sku=command.sku,
            merchant_id=command.merchant_id,
            category=command.category,
            grade=command.grade,
            brand=command.brand,
            model=command.model,
            energy_label_code=command.energy_label_code,
            list_price_fen=command.list_price_fen,
        )
    ]


def change_price(state: Product | None, command: ChangePrice) -> list[Message]:
    """A listed product gets a new list price (kept in the history the baseline reads)."""
    if state is None:
        raise unknown_sku(command.sku)
    if state.status == DELISTED:
        raise FailedPrecondition("PRODUCT_DELISTED", f"sku: {state.sku} is delisted", field="sku")
    if state.list_price_fen == command.list_price_fen:
        raise FailedPrecondition(
            "PRICE_UNCHANGED",
            f"list_price_fen: {state.sku} already costs {state.list_price_fen} fen",
            field="list_price_fen",
        )
    return [
        ev.ProductPriceChanged(
            sku=state.sku,
            old_price_fen=state.list_price_fen,
            new_price_fen=command.list_price_fen,
            reason=command.reason,
        )
    ]


def delist(state: Product | None, command: Delist) -> list[Message]:
    """A product is delisted once, for good."""
    if state is None:
        raise unknown_sku(command.sku)
    if state.status == DELISTED:
        raise FailedPrecondition(
            "PRODUCT_ALREADY_DELISTED", f"sku: {state.sku} is delisted already", field="sku"
        )
    return [ev.ProductDelisted(sku=state.sku, reason=command.reason)]


def evolve(state: Product | None, event: Message) -> Product:
    """The product after one of its events: the one place its status and price change."""
    if isinstance(event, ev.ProductRegistered):
        return Product(
            event.sku,
            event.merchant_id,
            event.category,
            event.grade,
            event.brand,
            event.model,
            event.energy_label_code,
            event.list_price_fen,
            LISTED,
        )
    if state is None:
        raise ValueError(f"product: {type(event).__name__} before ProductRegistered")
    if isinstance(event, ev.ProductPriceChanged):
        return replace(state, list_price_fen=event.new_price_fen)
    if isinstance(event, ev.ProductDelisted):
        return replace(state, status=DELISTED)
    raise ValueError(f"product: not a product event: {type(event).__name__}")
