"""The dashboard's pure parts: yuan from fen, the audit-log fold, the consumers' lag."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from services.kernel.events import Context, Envelope, new_envelope, service_actor
from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev
from subsidyctl.cli import main
from subsidyctl.dashboard import figures
from subsidyctl.dashboard.figures import LogFold, burn_down, outcomes_json, yuan
from subsidyctl.dashboard.monitor import consumer_lag
from subsidyctl.dashboard.server import TokenLogin, is_loopback

CTX = Context(service_actor("ledger"))
POOL = "budget-pool/p1"


def env(payload: Message, version: int, *, stream: str = POOL, service: str = "ledger") -> Envelope:
    return new_envelope(service, stream, payload, CTX, version=version)


def parts(**fen: int) -> list[common_pb2.SourceAmount]:
    return [common_pb2.SourceAmount(source=s, fen=a) for s, a in fen.items()]


def test_yuan_is_exact_integer_formatting_of_fen() -> None:
    assert yuan(0) == "0.00"
    assert yuan(5) == "0.05"
    assert yuan(100) == "1.00"
    assert yuan(123_456_789) == "1,234,567.89"
    assert yuan(-250) == "-2.50"
    # beyond a double's exact integers, still exact
    assert yuan(2**60 + 1) == "11,529,215,046,068,469.77"


@given(st.integers(min_value=-(10**20), max_value=10**20))
def test_yuan_reads_back_to_the_same_fen(fen: int) -> None:
    text = yuan(fen).replace(",", "")
    sign = -1 if text.startswith("-") else 1
    whole, cents = text.lstrip("-").split(".")
    assert len(cents) == 2
    assert sign * (int(whole) * 100 + int(cents)) == fen


def test_percent_text() -> None:
    assert figures.percent_bp(9500) == "95%"
    assert figures.percent_bp(1250) == "12.5%"
    assert figures.percent_bp(5) == "0.05%"


def campaign() -> list[Envelope]:
    """A pool funded by two sources; three orders: captured, cancelled, refunded after capture;
    one refused; a threshold alert; claims on two days."""
    return [
        env(ev.BudgetFunded(pool_id="p1", amount_fen=100_000, source="district"), 1),
        env(ev.BudgetFunded(pool_id="p1", amount_fen=50_000, source="platform"), 2),
        env(
            ev.SubsidyReserved(
                order_id="o1",
                pool_id="p1",
                category="tv",
                subsidy_fen=30_000,
                sources=parts(district=20_000, platform=10_000),
            ),
            3,
        ),
        env(
            ev.SubsidyCaptured(
                order_id="o1",
                pool_id="p1",
                subsidy_fen=30_000,
                category="tv",
                sources=parts(district=20_000, platform=10_000),
            ),
            4,
        ),
        env(
            ev.SubsidyReserved(
                order_id="o2",
                pool_id="p1",
                category="phone",
                subsidy_fen=6_000,
                sources=parts(district=4_000, platform=2_000),
            ),
            5,
        ),
        env(
            ev.SubsidyReleased(
                order_id="o2",
                pool_id="p1",
                subsidy_fen=6_000,
                reason="CANCELLED",
                category="phone",
                sources=parts(district=4_000, platform=2_000),
            ),
            6,
        ),
        env(ev.ReservationRefused(order_id="o3", pool_id="p1", reason="BUDGET_EXHAUSTED"), 7),
        env(
            ev.BudgetThresholdReached(
                pool_id="p1", threshold_bp=2000, spent_fen=30_000, base_fen=150_000, order_id="o1"
            ),
            8,
        ),
        env(
            ev.SubsidyReserved(
                order_id="o4",
                pool_id="p1",
                category="tv",
                subsidy_fen=1_000,
                sources=parts(district=1_000),
            ),
            9,
        ),
        env(
            ev.QualificationClaimed(category="tv", quota_day="2026-12-01"),
            1,
            stream="qualification/q1",
            service="eligibility",
        ),
        env(
            ev.QualificationClaimed(category="tv", quota_day="2026-11-30"),
            1,
            stream="qualification/q2",
            service="eligibility",
        ),
    ]


def test_the_fold_follows_each_pool_through_the_budget_fold() -> None:
    fold = LogFold()
    for e in campaign():
        fold.add(e)
    trail = fold.pools["p1"]
    assert (trail.pool.available, trail.pool.reserved, trail.pool.spent) == (119_000, 1_000, 30_000)
    assert {s.source: s.available for s in trail.pool.sources} == {
        "district": 79_000,
        "platform": 40_000,
    }
    assert dict(trail.used) == {"tv": 31_000, "phone": 0}
    rows = {r["outcome"]: r for r in outcomes_json(fold, "p1")}
    assert rows["pending"]["count"] == 1  # o4
    assert rows["reserved"]["count"] == 3
    assert rows["reserved"]["amount"]["fen"] == 37_000
    assert rows["captured"]["count"] == 1
    assert rows["released CANCELLED (before capture)"]["amount"]["yuan"] == "60.00"
    assert rows["refused BUDGET_EXHAUSTED"]["count"] == 1
    assert fold.claims[("2026-12-01", "tv")] == 1
    assert fold.claims[("2026-11-30", "tv")] == 1
    [alert] = fold.alerts
    assert alert.kind == "budget threshold"
    assert alert.text == "p1: the pool has spent 20% (300.00 of 1,500.00 yuan)"
    assert fold.seen == len(campaign())
    # one point per pool event that can move money (not the threshold alert)
    series = burn_down(trail)
    assert series["available"] == [
        *(100_000, 150_000, 120_000, 120_000, 114_000, 120_000, 120_000, 119_000)
    ]
    assert len(series["t_ms"]) == 8
    assert series["sources"]["platform"] == [0, 50_000, 40_000, 40_000, 38_000, *(40_000,) * 3]
    assert series["categories"]["tv"][-1] == 31_000


def test_a_pool_stream_is_folded_in_version_order_whatever_the_arrival_order() -> None:
    in_order, shuffled = LogFold(), LogFold()
    events = [e for e in campaign() if e.stream_id == POOL]
    for e in events:
        in_order.add(e)
    for e in [events[2], events[0], events[4], events[3], events[1], *events[5:], events[3]]:
        shuffled.add(e)  # out of order, and one version twice
    a, b = in_order.pools["p1"], shuffled.pools["p1"]
    assert b.pool == a.pool
    assert b.outcomes == a.outcomes
    assert b.next_version == {0: len(events) + 1}


def test_a_pool_split_into_shards_is_one_pool_each_shard_folded_in_its_own_order() -> None:
    """Shard 1's stream (``budget-pool/p1/1``) joins the pool's trail: the figures are the
    shards' summed, each shard folded in its version order however the log interleaves them."""
    shard1 = POOL + "/1"
    moved = parts(district=40_000)
    events = [
        env(ev.BudgetFunded(pool_id="p1", amount_fen=100_000, source="district"), 1),
        env(
            ev.ShardBudgetSent(
                pool_id="p1", from_shard=0, to_shard=1, amount_fen=40_000, sources=moved
            ),
            2,
        ),
        env(
            ev.ShardBudgetReceived(
                pool_id="p1", from_shard=0, to_shard=1, amount_fen=40_000, sources=moved
            ),
            1,
            stream=shard1,
        ),
        env(
            ev.SubsidyReserved(
                order_id="o1",
                pool_id="p1",
                category="tv",
                subsidy_fen=30_000,
                sources=parts(district=30_000),
            ),
            2,
            stream=shard1,
        ),
        env(
            ev.SubsidyCaptured(
                order_id="o1", pool_id="p1", subsidy_fen=30_000, sources=parts(district=30_000)
            ),
            3,
            stream=shard1,
        ),
    ]
    fold = LogFold()
    for e in [events[3], events[2], events[0], events[4], events[1]]:
        fold.add(e)
    assert list(fold.pools) == ["p1"]
    trail = fold.pools["p1"]
    assert not trail.broken
    figures = trail.pool
    assert (figures.funded, figures.available, figures.reserved, figures.spent) == (
        100_000,
        70_000,
        0,
        30_000,
    )
    assert trail.used["tv"] == 30_000
    assert trail.next_version == {0: 3, 1: 4}


def test_a_broken_invariant_stops_the_pool_and_raises_an_alert() -> None:
    fold = LogFold()
    fold.add(env(ev.BudgetFunded(pool_id="p1", amount_fen=100, source="district"), 1))
    fold.add(env(ev.SubsidyReserved(order_id="o", pool_id="p1", category="tv", subsidy_fen=500), 2))
    assert fold.pools["p1"].broken
    assert [a.kind for a in fold.alerts] == ["invariant"]
    assert fold.pools["p1"].pool.available == 100  # the figures before the violation


def test_burn_down_points_are_bounded_and_keep_the_latest() -> None:
    fold = LogFold()
    fold.add(env(ev.BudgetFunded(pool_id="p1", amount_fen=10**9, source="d"), 1))
    n = figures.MAX_POINTS * 3
    for i in range(n):
        fold.add(
            env(
                ev.SubsidyReserved(
                    order_id=f"o{i}",
                    pool_id="p1",
                    category="tv",
                    subsidy_fen=1,
                    sources=parts(d=1),
                ),
                i + 2,
            )
        )
    trail = fold.pools["p1"]
    assert len(trail.points) <= figures.MAX_POINTS
    assert trail.points[-1].available == 10**9 - n
    assert trail.points[0].available == 10**9


def test_consumer_lag_groups_durable_consumers_by_their_service() -> None:
    jsz = {
        "account_details": [
            {
                "stream_detail": [
                    {
                        "name": "SUBSIDY_EVENTS",
                        "consumer_detail": [
                            {"name": "audit-log", "num_pending": 7, "num_ack_pending": 2},
                            {"name": "catalog-sales", "num_pending": 0, "num_ack_pending": 0},
                            {"name": "someone-else", "num_pending": 99},
                        ],
                    },
                    {"name": "SUBSIDY_DLQ", "state": {"messages": 3}},
                ]
            }
        ]
    }
    lag = consumer_lag(jsz)
    by = {s["service"]: s for s in lag["services"]}
    assert by["audit"]["lag"] == 9
    assert by["audit"]["consumers"][0] == {
        "consumer": "audit-log",
        "pending": 7,
        "unacked": 2,
        "redelivered": 0,
    }
    assert by["catalog"]["lag"] == 0
    assert by["ledger"]["consumers"] == []  # declared as a consumer, none bound yet
    assert "someone" not in by
    assert lag["dead_lettered"] == 3


def test_the_token_compare_and_the_loopback_rule() -> None:
    login = TokenLogin("a" * 43, 7188)
    assert login.matches("a" * 43)
    assert not login.matches("a" * 42 + "b")
    assert not login.matches("")
    assert login.cookie == "subsidy-dashboard-7188"
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.3.4.5"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "192.168.1.10", "example.org", "::", ""):
        assert not is_loopback(host), host


@pytest.mark.parametrize("listen", ["0.0.0.0:7188", "10.1.2.3:7188", "[::]:7188"])
def test_a_token_dashboard_refuses_to_listen_beyond_loopback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], listen: str
) -> None:
    token = tmp_path / "token"
    token.write_text("t" * 43)
    code = main(["dashboard", "--listen", listen, "--token-file", str(token)])
    assert code == 2
    assert "binds loopback only" in capsys.readouterr().err


def test_the_dashboard_needs_exactly_one_way_in(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dashboard"]) == 2
    assert "exactly one of --token-file" in capsys.readouterr().err
