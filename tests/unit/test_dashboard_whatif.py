"""The dashboard's what-if panel: each draft awaiting approval, replayed from the log the
dashboard already folds."""

from __future__ import annotations

import dataclasses

from services.kernel.contract.policy import default_policy
from services.kernel.contract.policy_proto import policy_to_proto
from subsidy.v1 import events_pb2 as ev
from subsidyctl.dashboard.figures import LogFold

from .test_whatif import ACTUAL, DAY1, DAY2, campaign, env, with_tv


def drafted(version: str, cap_fen: int) -> ev.PolicyDrafted:
    draft = dataclasses.replace(with_tv(default_policy(), cap_fen=cap_fen), version=version)
    return ev.PolicyDrafted(version=version, policy=policy_to_proto(draft))


def folded(*extra: tuple[str, int, object]) -> LogFold:
    """The test campaign's log, then the catalog's policy events, in arrival order."""
    fold = LogFold()
    for e in campaign().envs:
        fold.add(e)
    for stream, n, event in extra:
        fold.add(env("catalog", stream, n, event, DAY2))  # type: ignore[arg-type]
    return fold


def test_a_draft_with_a_lower_cap_shows_its_saving_per_day_and_in_all() -> None:
    fold = folded(("policy/low", 1, drafted("low", 100_000)))
    assert fold.drafts() == ["low"]
    [panel] = fold.whatif_panels()
    assert panel["draft"] == "low"
    assert panel["actual"]["fen"] == 2 * ACTUAL  # o1 and o3 paid; o2 cancelled, o4 refunded
    assert panel["draft_subsidy"]["fen"] == 200_000
    assert panel["difference"] == {"fen": -120_000, "yuan": "-1,200.00"}
    assert panel["refused"] == 0
    assert [(d["day"], d["difference"]["fen"]) for d in panel["days"]] == [
        (DAY1.date().isoformat(), -60_000),
        (DAY2.date().isoformat(), -60_000),
    ]
    [pool] = panel["burn_down"]
    assert pool["pool_id"] == "p"
    assert pool["days"] == [DAY1.date().isoformat(), DAY2.date().isoformat()]
    assert (pool["actual"][-1], pool["draft"][-1]) == (1_000_000 - 320_000, 800_000)


def test_a_published_draft_is_no_longer_weighed() -> None:
    low = drafted("low", 100_000)
    published = ev.PolicyPublished(version="low", policy=low.policy)
    fold = folded(("policy/low", 1, low), ("policy/low", 2, published))
    assert fold.drafts() == []
    assert fold.whatif_panels() == []


def test_the_panel_follows_the_log_as_it_grows() -> None:
    fold = folded(("policy/low", 1, drafted("low", 100_000)))
    [before] = fold.whatif_panels()
    assert fold.whatif_panels() == [before]  # nothing new: the same answer
    at = DAY2
    version = len([e for e in campaign().envs if e.service == "ledger"]) + 1
    fold.add(env("ledger", "budget-pool/p", version, ev.SubsidyReserved(
        order_id="o5", pool_id="p", sku="s1", merchant_id="m", category="tv",
        unit_price_fen=800_000, subsidy_fen=ACTUAL), at))  # fmt: skip
    fold.add(env("ledger", "budget-pool/p", version + 1, ev.SubsidyCaptured(
        order_id="o5", pool_id="p", subsidy_fen=ACTUAL, category="tv"), at))  # fmt: skip
    [after] = fold.whatif_panels()
    assert after["difference"]["fen"] == -180_000
    assert after["orders"] == before["orders"] + 1
