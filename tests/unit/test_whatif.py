"""Policy what-if: the history of orders replayed under a draft policy, from events alone."""

from __future__ import annotations

import dataclasses
import datetime as dt

from google.protobuf.message import Message

from services.audit.totals import Rebuild
from services.audit.whatif import WhatIf, WhatIfFold, replay
from services.kernel.contract.policy import FundingRules, Policy, default_policy
from services.kernel.events import Context, Envelope, new_envelope, service_actor
from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev

SHANGHAI = dt.timezone(dt.timedelta(hours=8))
DAY1 = dt.datetime(2025, 6, 1, 10, 0, tzinfo=SHANGHAI)
DAY2 = DAY1 + dt.timedelta(days=1)
PRICE = 800_000  # 8,000 yuan: 20 % of it is 1,600 yuan, under the 2,000-yuan cap
ACTUAL = 160_000
POOL_STREAM = "budget-pool/p"
SHARD_1 = "budget-pool/p/1"


def env(service: str, stream: str, version: int, event: Message, at: dt.datetime) -> Envelope:
    e = new_envelope(service, stream, event, Context(service_actor(service)), version=version)
    e.occurred_at.FromDatetime(at)
    return e


class History:
    """A pool's stream as the ledger wrote it, and the catalog's product registration."""

    def __init__(self, funded_fen: int = 1_000_000) -> None:
        self.envs = [
            env("catalog", "product/s1", 1, ev.ProductRegistered(
                sku="s1", category="tv", grade=1), DAY1),
            env("ledger", "budget-pool/p", 1, ev.BudgetFunded(
                pool_id="p", amount_fen=funded_fen, source="district"), DAY1),
        ]  # fmt: skip
        self.versions = {POOL_STREAM: 1}

    def add(self, event: Message, at: dt.datetime, stream: str = POOL_STREAM) -> None:
        self.versions[stream] = self.versions.get(stream, 0) + 1
        self.envs.append(env("ledger", stream, self.versions[stream], event, at))

    def order(
        self, order_id: str, at: dt.datetime, *, then: str = "capture", stream: str = POOL_STREAM
    ) -> None:
        """An order reserved at the policy's subsidy, then captured (and maybe refunded) or
        cancelled; on the pool's stream, or one of its shards' (``stream``)."""
        self.add(ev.SubsidyReserved(
            order_id=order_id, pool_id="p", sku="s1", merchant_id="m", category="tv",
            unit_price_fen=PRICE, subsidy_fen=ACTUAL), at, stream)  # fmt: skip
        if then == "cancel":
            self.add(ev.SubsidyReleased(order_id=order_id, pool_id="p", subsidy_fen=ACTUAL,
                                        reason="CANCELLED", category="tv"), at, stream)  # fmt: skip
            return
        self.add(ev.SubsidyCaptured(order_id=order_id, pool_id="p", subsidy_fen=ACTUAL,
                                    category="tv"), at, stream)  # fmt: skip
        if then == "refund":
            self.add(ev.SubsidyReleased(order_id=order_id, pool_id="p", subsidy_fen=ACTUAL,
                                        reason="REFUNDED", was_captured=True, category="tv"),
                     at, stream)  # fmt: skip

    def under(self, draft: Policy, start: dt.date | None = None) -> WhatIf:
        r = Rebuild([WhatIfFold()])
        for e in reversed(self.envs):  # any arrival order: each stream is replayed in order
            r.add(e)
        fold = r.finish()["whatif"]
        assert isinstance(fold, WhatIfFold)
        return replay(fold, draft, start)


def campaign() -> History:
    h = History()
    h.order("o1", DAY1)
    h.order("o2", DAY1, then="cancel")
    h.order("o3", DAY2)
    h.order("o4", DAY2, then="refund")
    return h


def with_tv(policy: Policy, **changes: object) -> Policy:
    rules = tuple(
        dataclasses.replace(c, **changes) if c.code == "tv" else c  # type: ignore[arg-type]
        for c in policy.categories
    )
    return dataclasses.replace(policy, version="draft", categories=rules)


def test_the_policy_the_orders_were_made_under_reproduces_history_to_the_fen() -> None:
    result = campaign().under(default_policy())
    assert result.changed() == []
    days = result.days()
    assert days[("2025-06-01", "tv")]["actual_subsidy_fen"] == ACTUAL  # o2 was cancelled
    assert days[("2025-06-02", "tv")]["actual_subsidy_fen"] == ACTUAL  # o4 was refunded
    assert all(row["difference_fen"] == 0 for row in days.values())
    for figures in result.burn_down.values():
        assert figures["draft_available_fen"] == figures["actual_available_fen"]
        assert figures["draft_spent_fen"] == figures["actual_spent_fen"]
    assert result.summary()["difference_fen"] == 0


def test_a_lower_cap_saves_the_difference_on_every_order_paid() -> None:
    result = campaign().under(with_tv(default_policy(), cap_fen=100_000))
    days = result.days()
    assert days[("2025-06-01", "tv")]["draft_subsidy_fen"] == 100_000
    assert days[("2025-06-01", "tv")]["difference_fen"] == -60_000
    assert days[("2025-06-02", "tv")]["difference_fen"] == -60_000
    assert result.summary()["difference_fen"] == -120_000
    assert sorted(o.order_id for o in result.changed()) == ["o1", "o3"]  # paid, and less
    end = result.burn_down[("p", "2025-06-02")]
    assert (end["actual_spent_fen"], end["draft_spent_fen"]) == (320_000, 200_000)
    assert end["draft_available_fen"] == 800_000


def test_a_category_the_draft_drops_refuses_its_orders() -> None:
    policy = default_policy()
    draft = dataclasses.replace(
        policy, version="draft", categories=tuple(c for c in policy.categories if c.code != "tv")
    )
    result = campaign().under(draft)
    assert {o.order_id: o.refused for o in result.changed()} == {
        "o1": "UNKNOWN_CATEGORY",
        "o2": "UNKNOWN_CATEGORY",
        "o3": "UNKNOWN_CATEGORY",
        "o4": "UNKNOWN_CATEGORY",
    }
    assert result.summary()["draft_subsidy_fen"] == 0
    assert result.days()[("2025-06-01", "tv")]["refused_by_draft"] == 2


def test_a_richer_draft_runs_out_of_budget_where_the_real_one_did_not() -> None:
    h = History(funded_fen=350_000)  # pays two orders at 1,600 yuan, not two at 2,000
    h.order("o1", DAY1)
    h.order("o3", DAY2)
    result = h.under(with_tv(default_policy(), grades=((1, 2500), (2, 1500))))
    assert [(o.order_id, o.refused) for o in result.changed()] == [
        ("o1", ""),
        ("o3", "BUDGET_EXHAUSTED"),
    ]
    assert result.summary()["draft_subsidy_fen"] == 200_000


def test_a_sub_budget_in_the_draft_caps_the_category() -> None:
    draft = dataclasses.replace(
        default_policy(), version="draft", funding=FundingRules(sub_budgets=(("tv", 2000),))
    )  # 20 % of 1,000,000 fen: one order of 160,000 fits, a second does not
    result = campaign().under(draft)
    assert {o.order_id: o.refused for o in result.changed()} == {
        "o2": "SUB_BUDGET_EXHAUSTED",  # o1's 160,000 fen spent leaves 40,000 of the cap
        "o3": "SUB_BUDGET_EXHAUSTED",
        "o4": "SUB_BUDGET_EXHAUSTED",
    }
    assert result.summary()["draft_subsidy_fen"] == ACTUAL


def test_orders_before_the_period_keep_what_they_had() -> None:
    result = campaign().under(with_tv(default_policy(), cap_fen=100_000), start=DAY2.date())
    assert list(result.days()) == [("2025-06-02", "tv")]
    assert [o.order_id for o in result.changed()] == ["o3"]
    end = result.burn_down[("p", "2025-06-02")]
    assert end["draft_spent_fen"] == ACTUAL + 100_000  # o1 at what it had, o3 at the draft's


def test_a_pool_split_into_shards_is_weighed_whole_as_one_pool_would_be() -> None:
    """The same orders on a pool of two shards (half the budget moved to shard 1, which takes
    o2 and o4): the draft's replay is the one pool's, order by order and day by day; the moves
    between shards are no spending."""
    one = campaign()
    two = History()
    moved = [common_pb2.SourceAmount(source="district", fen=500_000)]
    two.add(ev.PoolSharded(pool_id="p", shards=2), DAY1)
    two.add(ev.ShardBudgetSent(pool_id="p", from_shard=0, to_shard=1, amount_fen=500_000,
                               sources=moved), DAY1)  # fmt: skip
    two.add(ev.ShardBudgetReceived(pool_id="p", from_shard=0, to_shard=1, amount_fen=500_000,
                                   sources=moved), DAY1, SHARD_1)  # fmt: skip
    two.order("o1", DAY1)
    two.order("o2", DAY1, then="cancel", stream=SHARD_1)
    two.order("o3", DAY2)
    two.order("o4", DAY2, then="refund", stream=SHARD_1)
    for draft in (default_policy(), with_tv(default_policy(), cap_fen=100_000)):
        a, b = one.under(draft), two.under(draft)
        assert b.orders == a.orders
        assert b.burn_down == a.burn_down
        assert {pool for pool, _ in b.burn_down} == {"p"}
