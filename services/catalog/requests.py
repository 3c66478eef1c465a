"""The catalog's edge: every request is validated here, once, and becomes a command.

The servicer (``api.py``) calls one function per request; what it gets back is well-formed
(identifiers, lengths, prices, grades, the policy document) and carries its actor: operator
verbs need a named operator or approver and a reason, merchant onboarding records the actor it
is given or ``unknown``. The use cases (``handlers.py``) and the decisions (``domain/``) never
validate a field again; the bulk importer validates each row with :func:`registration`, the
same function RegisterProduct uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from services.kernel import validate
from services.kernel.contract.limits import MAX_GRADE, NO_GRADE
from services.kernel.contract.personal_data import InvalidPhone, mask_phone, validate_phone
from services.kernel.contract.policy import PolicyError, policy_from_text
from services.kernel.errors import InvalidArgument
from services.kernel.events import Context
from services.kernel.identity import caller
from subsidy.v1 import catalog_pb2, common_pb2

from . import domain

# Unified social credit code (统一社会信用代码): 18 characters, no I, O, Z, S, V.
LICENCE: Final = re.compile(r"^[0-9A-HJ-NPQRTUWXY]{2}\d{6}[0-9A-HJ-NPQRTUWXY]{10}$")
MAX_POLICY_BYTES: Final = 256 * 1024
MAX_REASON: Final = 500


@dataclass(frozen=True)
class QuoteQuery:
    category: str
    grade: int  # 0 = no efficiency grade
    price_fen: int
    policy_version: str  # "" = the version in force


@dataclass(frozen=True)
class ItemQuery:
    sku: str
    unit_price_fen: int
    serial: str  # canonical form, or ""
    policy_version: str


# -- actors ----------------------------------------------------------------------------------


def operator(requested: common_pb2.Actor, reason: str) -> Context:
    """An operator verb: a reason, and the authenticated caller as the actor (the authorisation
    table has already let only operators or approvers in). The request's ``actor`` field is
    ignored: who acts is what the client certificate says. The reason travels on the envelope's
    actor."""
    reason = validate.text_field("reason", reason, max_len=MAX_REASON)
    return Context(caller().actor(reason))


def onboarding(requested: common_pb2.Actor, reason: str = "") -> Context:
    """Merchant and product onboarding, by a platform or an operator: the authenticated caller
    is the actor (the request's ``actor`` field is ignored)."""
    return Context(caller().actor(reason))


# -- policy ----------------------------------------------------------------------------------


def draft_policy(
    request: catalog_pb2.DraftPolicyRequest,
) -> tuple[domain.DraftPolicy, Context]:
    ctx = operator(request.actor, request.reason)
    document = request.document
    if not document.strip():
        raise InvalidArgument("MISSING_FIELD", "document: required", field="document")
    if len(document.encode()) > MAX_POLICY_BYTES:
        raise InvalidArgument(
            "FIELD_TOO_LONG", f"document: at most {MAX_POLICY_BYTES} bytes", field="document"
        )
    try:
        policy = policy_from_text(document)
    except PolicyError as exc:
        located = exc.path and not exc.path.startswith(("line ", "yaml"))
        where = f"document.{exc.path}" if located else "document"
        raise InvalidArgument(
            "INVALID_POLICY",
            f"{where}: {exc.problem}",
            field=where,
            **({} if located else {"location": exc.path}),
        ) from None
    return domain.DraftPolicy(policy, ctx.actor.reason), ctx


def approve_policy(
    request: catalog_pb2.ApprovePolicyRequest,
) -> tuple[domain.ApprovePolicy, Context]:
    version = validate.identifier("version", request.version)
    ctx = operator(request.actor, request.reason)
    return domain.ApprovePolicy(version, ctx.actor, ctx.actor.reason), ctx


def policy_version(version: str, field: str = "version") -> str:
    """A version name, or "" for the version in force."""
    return validate.identifier(field, version) if version else ""


def grade(value: int) -> int:
    if value < NO_GRADE or value > MAX_GRADE:
        raise InvalidArgument(
            "INVALID_GRADE", f"grade: {NO_GRADE} (none) or 1..{MAX_GRADE}", field="grade"
        )
    return value


def category(value: str) -> str:
    return validate.text_field("category", value, max_len=64)


def quote(request: catalog_pb2.QuoteRequest) -> QuoteQuery:
    grade_ = grade(request.grade)
    price = validate.price_fen("price_fen", request.price_fen)
    code = category(request.category)
    return QuoteQuery(code, grade_, price, policy_version(request.policy_version, "policy_version"))


# -- switches --------------------------------------------------------------------------------


def pause_category(
    request: catalog_pb2.CategorySwitchRequest,
) -> tuple[domain.PauseCategory, Context]:
    code = category(request.category)
    ctx = operator(request.actor, request.reason)
    return domain.PauseCategory(code, ctx.actor.reason), ctx


def resume_category(
    request: catalog_pb2.CategorySwitchRequest,
) -> tuple[domain.ResumeCategory, Context]:
    code = category(request.category)
    ctx = operator(request.actor, request.reason)
    return domain.ResumeCategory(code, ctx.actor.reason), ctx


def pause_campaign(
    request: catalog_pb2.CampaignSwitchRequest,
) -> tuple[domain.PauseCampaign, Context]:
    ctx = operator(request.actor, request.reason)
    return domain.PauseCampaign(ctx.actor.reason), ctx


def resume_campaign(
    request: catalog_pb2.CampaignSwitchRequest,
) -> tuple[domain.ResumeCampaign, Context]:
    ctx = operator(request.actor, request.reason)
    return domain.ResumeCampaign(ctx.actor.reason), ctx


# -- merchants -------------------------------------------------------------------------------


def merchant_id(value: str) -> str:
    return validate.identifier("merchant_id", value)


def apply_merchant(
    request: catalog_pb2.ApplyMerchantRequest,
) -> tuple[domain.ApplyMerchant, Context]:
    """The contact phone is masked here: the number itself goes no further than this."""
    mid = merchant_id(request.merchant_id)
    name = validate.text_field("name", request.name, max_len=200)
    licence = request.licence_number.strip().upper()
    if not LICENCE.match(licence):
        raise InvalidArgument(
            "INVALID_LICENCE",
            "licence_number: an 18-character unified social credit code",
            field="licence_number",
        )
    try:
        masked = mask_phone(validate_phone(request.contact_phone))
    except InvalidPhone as exc:
        raise InvalidArgument(exc.reason, f"contact_phone: {exc}", field="contact_phone") from None
    return domain.ApplyMerchant(mid, name, licence, masked), onboarding(request.actor)


def review_merchant(
    request: catalog_pb2.ReviewMerchantRequest,
) -> tuple[domain.ReviewMerchant, Context]:
    """Approve, or reject with a reason."""
    mid = merchant_id(request.merchant_id)
    reason = validate.text_field(
        "reason", request.reason, max_len=MAX_REASON, required=not request.approve
    )
    return domain.ReviewMerchant(mid, request.approve, reason), onboarding(request.actor, reason)


def suspend_merchant(
    request: catalog_pb2.MerchantActionRequest,
) -> tuple[domain.SuspendMerchant, Context]:
    mid = merchant_id(request.merchant_id)
    ctx = operator(request.actor, request.reason)
    return domain.SuspendMerchant(mid, ctx.actor.reason), ctx


def reinstate_merchant(
    request: catalog_pb2.MerchantActionRequest,
) -> tuple[domain.ReinstateMerchant, Context]:
    mid = merchant_id(request.merchant_id)
    ctx = operator(request.actor, request.reason)
    return domain.ReinstateMerchant(mid, ctx.actor.reason), ctx


# -- products --------------------------------------------------------------------------------


def sku(value: str) -> str:
    return validate.identifier("sku", value)


def registration(
    sku_: str,
    merchant_id_: str,
    category_: str,
    grade_: int,
    brand: str,
    model: str,
    energy_label_code: str,
    list_price_fen: int,
) -> domain.RegisterProduct:
    """A product registration, well-formed: the same rules for one product and for each row
    of a bulk import (the category is checked against the policy by the decision)."""
    validate.identifier("sku", sku_)
    validate.identifier("merchant_id", merchant_id_)
    return domain.RegisterProduct(
        sku=sku_,
        merchant_id=merchant_id_,
        category=validate.text_field("category", category_, max_len=64),
        brand=validate.text_field("brand", brand, max_len=100),
        model=validate.text_field("model", model, max_len=100),
        energy_label_code=validate.text_field(
            "energy_label_code", energy_label_code, max_len=64, required=False
        ),
        list_price_fen=validate.price_fen("list_price_fen", list_price_fen),
        grade=grade(grade_),
    )


def register_product(
    request: catalog_pb2.RegisterProductRequest,
) -> tuple[domain.RegisterProduct, Context]:
    command = registration(
        request.sku,
        request.merchant_id,
        request.category,
        request.grade,
        request.brand,
        request.model,
        request.energy_label_code,
        request.list_price_fen,
    )
    return command, onboarding(request.actor)


def change_price(
    request: catalog_pb2.UpdatePriceRequest,
) -> tuple[domain.ChangePrice, Context]:
    code = sku(request.sku)
    price = validate.price_fen("list_price_fen", request.list_price_fen)
    ctx = operator(request.actor, request.reason)
    return domain.ChangePrice(code, price, ctx.actor.reason), ctx


def delist(request: catalog_pb2.DelistProductRequest) -> tuple[domain.Delist, Context]:
    code = sku(request.sku)
    ctx = operator(request.actor, request.reason)
    return domain.Delist(code, ctx.actor.reason), ctx


def import_products(request: catalog_pb2.ImportProductsRequest) -> Context:
    """The file itself is validated row by row by the importer (``read_rows``)."""
    return operator(request.actor, request.reason)


# -- the checkout ----------------------------------------------------------------------------


def verify_item(request: catalog_pb2.VerifyItemRequest) -> ItemQuery:
    return ItemQuery(
        sku=sku(request.sku),
        unit_price_fen=validate.price_fen("unit_price_fen", request.unit_price_fen),
        serial=validate.serial("serial", request.serial) if request.serial else "",
        policy_version=policy_version(request.policy_version, "policy_version"),
    )
