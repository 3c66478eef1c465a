"""Catalog decisions, pure: one module per aggregate, each with its state, its commands, its
decisions (state + command -> events, or a named error) and its ``evolve`` (state + event ->
state), which the projections call instead of deciding statuses themselves.

- :mod:`.policy_version`: ``policy/{version}``, drafted and approved (maker-checker);
- :mod:`.switches`: the ``switches`` stream (category and campaign pauses);
- :mod:`.merchant`: ``merchant/{id}``; :mod:`.product`: ``product/{sku}``;
- :mod:`.item`: the item verdict and the price baseline, read by the checkout.

No I/O, no clock (``now`` comes in as a value), no transport. docs/catalog.md lists every
reason.
"""

from __future__ import annotations

from . import merchant, policy_version, product, switches
from .common import (
    APPLIED,
    APPROVED,
    CAPTURED,
    DELISTED,
    DRAFT,
    LISTED,
    REJECTED,
    RELEASED,
    RESERVED,
    SUSPENDED,
    Meta,
)
from .item import (
    CAMPAIGN_PAUSED,
    CATEGORY_PAUSED,
    MERCHANT_NOT_APPROVED,
    MERCHANT_SUSPENDED,
    PRICE_ABOVE_BASELINE,
    PRODUCT_DELISTED,
    SERIAL_ALREADY_SUBSIDISED,
    SERIAL_RESERVED,
    UNKNOWN_SKU,
    ItemFacts,
    ItemVerdict,
    mask_reference,
    price_baseline,
    price_limit,
    quote_category,
    verdict,
)
from .merchant import (
    ApplyMerchant,
    Merchant,
    ReinstateMerchant,
    ReviewMerchant,
    SuspendMerchant,
    apply_merchant,
    reinstate_merchant,
    review_merchant,
    suspend_merchant,
)
from .policy_version import (
    APPROVAL_LEAD,
    ApprovePolicy,
    DraftPolicy,
    PolicyRecord,
    approve_policy,
    draft_policy,
    publish_default,
    require_approver,
)
from .product import (
    ChangePrice,
    Delist,
    Product,
    RegisterProduct,
    change_price,
    delist,
    register_product,
)
from .switches import (
    Pause,
    PauseCampaign,
    PauseCategory,
    ResumeCampaign,
    ResumeCategory,
    Switches,
    pause_campaign,
    pause_category,
    resume_campaign,
    resume_category,
)

__all__ = [
    "APPLIED",
    "APPROVAL_LEAD",
    "APPROVED",
    "CAMPAIGN_PAUSED",
    "CAPTURED",
    "CATEGORY_PAUSED",
    "DELISTED",
    "DRAFT",
    "LISTED",
    "MERCHANT_NOT_APPROVED",
    "MERCHANT_SUSPENDED",
    "PRICE_ABOVE_BASELINE",
    "PRODUCT_DELISTED",
    "REJECTED",
    "RELEASED",
    "RESERVED",
    "SERIAL_ALREADY_SUBSIDISED",
    "SERIAL_RESERVED",
    "SUSPENDED",
    "UNKNOWN_SKU",
    "ApplyMerchant",
    "ApprovePolicy",
    "ChangePrice",
    "Delist",
    "DraftPolicy",
    "ItemFacts",
    "ItemVerdict",
    "Merchant",
    "Meta",
    "Pause",
    "PauseCampaign",
    "PauseCategory",
    "PolicyRecord",
    "Product",
    "RegisterProduct",
    "ReinstateMerchant",
    "ResumeCampaign",
    "ResumeCategory",
    "ReviewMerchant",
    "SuspendMerchant",
    "Switches",
    "apply_merchant",
    "approve_policy",
    "change_price",
    "delist",
    "draft_policy",
    "mask_reference",
    "merchant",
    "pause_campaign",
    "pause_category",
    "policy_version",
    "price_baseline",
    "price_limit",
    "product",
    "publish_default",
    "quote_category",
    "register_product",
    "reinstate_merchant",
    "require_approver",
    "resume_campaign",
    "resume_category",
    "review_merchant",
    "suspend_merchant",
    "switches",
    "verdict",
]
