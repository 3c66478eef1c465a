"""The funding decisions the ledger makes and the auditor's what-if replays, pure.

Whether a pool can pay one subsidy now (never overspend the pool, a category's sub-budget or a
funding source) and which sources pay it (the policy's split rule). The ledger decides every
reservation with these (``services.ledger.domain``); ``subsidyctl policy whatif`` replays the
history of orders under a draft policy with the same functions, so a what-if of the policy in
force reproduces what happened to the fen.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from google.protobuf.message import Message

from services.kernel.contract.budget import Parts, Pool, split_priority, split_pro_rata
from services.kernel.contract.policy import BP_DENOMINATOR, FundingRules, Split
from services.kernel.errors import FailedPrecondition, NotFound, ResourceExhausted
from subsidy.v1 import events_pb2 as ev

# The rules of a policy without a funding part: any source, priority in funding order.
DEFAULT_RULES = FundingRules()


@dataclass(frozen=True)
class CategoryUse:
    """What one category holds (reserved) and has spent of one pool."""

    category: str
    reserved: int = 0
    spent: int = 0


def check_budget(pool: Pool | None, pool_id: str, subsidy_fen: int) -> Pool:
    """The pool exists and can pay ``subsidy_fen`` now: never overspend."""
    if pool is None:
        raise NotFound("UNKNOWN_POOL", f"pool_id: no budget pool {pool_id!r}", field="pool_id")
    if subsidy_fen <= 0:
        raise FailedPrecondition("NO_SUBSIDY", "the item earns no subsidy", field="sku")
    if subsidy_fen > pool.available:
        raise ResourceExhausted(
            "BUDGET_EXHAUSTED",
            f"budget pool {pool.pool_id} has {pool.available} fen left, {subsidy_fen} fen needed",
            field="pool_id",
        )
    return pool


def check_sub_budget(
    pool: Pool, category: CategoryUse | None, name: str, subsidy_fen: int, rules: FundingRules
) -> None:
    """A category with a sub-budget holds and spends at most its share of the pool's funded
    amount (rounded down to the fen)."""
    share_bp = rules.sub_budget_bp(name)
    if share_bp is None:
        return
    cap = pool.funded * share_bp // BP_DENOMINATOR
    used = (category.reserved + category.spent) if category is not None else 0
    if used + subsidy_fen > cap:
        raise ResourceExhausted(
            "SUB_BUDGET_EXHAUSTED",
            f"budget pool {pool.pool_id}: category {name} has {max(cap - used, 0)} fen left of"
            f" its sub-budget of {cap} fen, {subsidy_fen} fen needed",
            field="pool_id",
            pool_id=pool.pool_id,
            category=name,
        )


def split(pool: Pool, subsidy_fen: int, rules: FundingRules) -> Parts:
    """Which source holds how much of a subsidy the pool can pay, by the split rule. A pool
    whose fundings named no source records no parts (its money is all unattributed). Under
    pro rata a source that cannot pay its share refuses the order: SOURCE_EXHAUSTED."""
    if not pool.sources:
        return ()
    payers = pool.payers()
    if rules.split is Split.PRIORITY:
        return split_priority(payers, subsidy_fen, rules.priority)
    parts = split_pro_rata(payers, subsidy_fen)
    for name, fen in parts:
        found = pool.source(name) or pool.unattributed
        if fen > found.available:
            raise ResourceExhausted(
                "SOURCE_EXHAUSTED",
                f"budget pool {pool.pool_id}: source {name or '(none)'} has {found.available}"
                f" fen left, its pro-rata part is {fen} fen",
                field="pool_id",
                pool_id=pool.pool_id,
                source=name,
            )
    return parts


def check_funds(
    pool: Pool | None,
    pool_id: str,
    category: str,
    subsidy_fen: int,
    rules: FundingRules = DEFAULT_RULES,
    use: CategoryUse | None = None,
    total: Pool | None = None,
) -> Parts:
    """The pool can pay ``subsidy_fen`` for an item of ``category`` now (the pool, the
    category's sub-budget, each source's part, in that order); returns the source parts.
    ``pool`` is one shard of a pool split into shards: it pays, while the sub-budget is a
    share of the whole pool's funding (``total``; None: ``pool`` is the whole pool)."""
    checked = check_budget(pool, pool_id, subsidy_fen)
    check_sub_budget(total or checked, use, category, subsidy_fen, rules)
    return split(checked, subsidy_fen, rules)


def evolve_use(use: CategoryUse, event: Message) -> CategoryUse:
    """A category's use of a pool after one of its orders' events."""
    if isinstance(event, ev.SubsidyReserved):
        return replace(use, reserved=use.reserved + event.subsidy_fen)
    if isinstance(event, ev.SubsidyCaptured):
        return replace(
            use, reserved=use.reserved - event.subsidy_fen, spent=use.spent + event.subsidy_fen
        )
    if isinstance(event, ev.SubsidyReleased):
        if event.was_captured:
            return replace(use, spent=use.spent - event.subsidy_fen)
        return replace(use, reserved=use.reserved - event.subsidy_fen)
    return use
