"""Merchants: APPLIED -> reviewed APPROVED or REJECTED; APPROVED <-> SUSPENDED."""

from __future__ import annotations

from dataclasses import dataclass, replace

from google.protobuf.message import Message

from services.kernel.errors import AlreadyExists, FailedPrecondition, NotFound
from subsidy.v1 import events_pb2 as ev

from .common import APPLIED, APPROVED, REJECTED, SUSPENDED


@dataclass(frozen=True)
class Merchant:
    merchant_id: str
    name: str
    licence_number: str
    contact_masked: str  # the contact phone, masked at the edge: never the number itself
    status: str
    status_reason: str = ""


@dataclass(frozen=True)
class ApplyMerchant:
    merchant_id: str
    name: str
    licence_number: str
    contact_masked: str


@dataclass(frozen=True)
class ReviewMerchant:
    merchant_id: str
    approve: bool
    reason: str  # required for a rejection (checked at the edge)


@dataclass(frozen=True)
class SuspendMerchant:
    merchant_id: str
    reason: str


@dataclass(frozen=True)
class ReinstateMerchant:
    merchant_id: str
    reason: str


def unknown_merchant(merchant_id: str) -> NotFound:
    return NotFound(
        "UNKNOWN_MERCHANT", f"merchant_id: no merchant {merchant_id!r}", field="merchant_id"
    )


def apply_merchant(state: Merchant | None, command: ApplyMerchant) -> list[Message]:
    """A merchant applies once; its application waits for a review."""
    if state is not None:
        raise AlreadyExists(
            "MERCHANT_EXISTS",
            f"merchant_id: {command.merchant_id} has applied already",
            field="merchant_id",
        )
    return [
        ev.MerchantApplied(
            merchant_id=command.merchant_id,
            name=command.name,
            licence_number=command.licence_number,
            contact_masked=command.contact_masked,
        )
    ]


def review_merchant(state: Merchant | None, command: ReviewMerchant) -> list[Message]:
    """An application is reviewed once: approved, or rejected with a reason."""
    if state is None:
        raise unknown_merchant(command.merchant_id)
    if state.status != APPLIED:
        raise FailedPrecondition(
            "MERCHANT_ALREADY_REVIEWED",
            f"merchant_id: {state.merchant_id} is {state.status}",
            field="merchant_id",
        )
    return [
        ev.MerchantReviewed(
            merchant_id=state.merchant_id, approved=command.approve, reason=command.reason
        )
    ]


def suspend_merchant(state: Merchant | None, command: SuspendMerchant) -> list[Message]:
    """Only an approved merchant can be suspended."""
    if state is None:
        raise unknown_merchant(command.merchant_id)
    if state.status == SUSPENDED:
        raise FailedPrecondition(
            "MERCHANT_ALREADY_SUSPENDED",
            f"merchant_id: {state.merchant_id} is suspended already",
            field="merchant_id",
        )
    if state.status != APPROVED:
        raise FailedPrecondition(
            "MERCHANT_NOT_APPROVED",
            f"merchant_id: {state.merchant_id} is {state.status}",
            field="merchant_id",
        )
    return [ev.MerchantSuspended(merchant_id=state.merchant_id, reason=command.reason)]


def reinstate_merchant(state: Merchant | None, command: ReinstateMerchant) -> list[Message]:
    """Only a suspended merchant can be reinstated (it is approved again)."""
    if state is None:
        raise unknown_merchant(command.merchant_id)
    if state.status != SUSPENDED:
        raise FailedPrecondition(
            "MERCHANT_NOT_SUSPENDED",
            f"merchant_id: {state.merchant_id} is {state.status}",
            field="merchant_id",
        )
    return [ev.MerchantReinstated(merchant_id=state.merchant_id, reason=command.reason)]


def evolve(state: Merchant | None, event: Message) -> Merchant:
    """The merchant after one of its events: the one place its status changes."""
    if isinstance(event, ev.MerchantApplied):
        return Merchant(
            event.merchant_id, event.name, event.licence_number, event.contact_masked, APPLIED
        )
    if state is None:
        raise ValueError(f"merchant: {type(event).__name__} before MerchantApplied")
    if isinstance(event, ev.MerchantReviewed):
        status = APPROVED if event.approved else REJECTED
        return replace(state, status=status, status_reason=event.reason)
    if isinstance(event, ev.MerchantSuspended):
        return replace(state, status=SUSPENDED, status_reason=event.reason)
    if isinstance(event, ev.MerchantReinstated):
        return replace(state, status=APPROVED, status_reason=event.reason)
    raise ValueError(f"merchant: not a merchant event: {type(event).__name__}")
