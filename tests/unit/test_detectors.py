"""Post-hoc detectors on crafted histories: each finds its planted fraud, and leaves alone the
honest history that looks most like it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from bench.fraud import CraftedLog
from services.audit.detection import rules_from_file
from services.audit.detectors import DetectorRules, Finding, detect

T0 = dt.datetime(2025, 6, 1, 2, 0, tzinfo=dt.UTC)
RULES = DetectorRules()


class Log(CraftedLog):
    """A crafted log (the benchmark's builder) and the findings of one detector over it."""

    def findings(
        self, detector: str, now: dt.datetime = T0 + dt.timedelta(days=60)
    ) -> list[Finding]:
        return [f for f in detect(reversed(self.envs), RULES, now) if f.detector == detector]


def days(n: float) -> dt.timedelta:
    return dt.timedelta(days=n)


def test_a_price_raised_above_the_models_lowest_price_is_found() -> None:
    log = Log()
    log.product("s1", 500_000)
    log.price("s1", 500_000, 600_000, T0 + days(10))  # +20 %, over the 10 % tolerance
    raised = log.order(T0 + days(11), price=600_000)
    (found,) = log.findings("price_raise")
    assert (found.subject, found.reason) == (raised, "PRICE_RAISED")
    assert dict(found.evidence)["lowest_price_fen"] == "500000"
    assert dict(found.evidence)["rise_bp"] == "2000"


def test_a_model_re_registered_under_a_new_sku_does_not_reset_its_baseline() -> None:
    log = Log()
    log.product("s1", 500_000)
    log.product("s1-new", 650_000, T0 + days(20))  # same merchant, brand and model
    sold = log.order(T0 + days(21), sku="s1-new", price=650_000)
    (found,) = log.findings("price_raise")
    assert (found.subject, found.reason) == (sold, "BASELINE_RESET_BY_NEW_SKU")
    assert dict(found.evidence)["lowest_price_sku"] == "s1"


def test_prices_within_the_tolerance_or_older_than_the_window_are_not_findings() -> None:
    log = Log()
    log.product("s1", 500_000)
    log.price("s1", 500_000, 550_000, T0 + days(1))  # +10 %: at the tolerance, not above
    log.order(T0 + days(2), price=550_000)
    log.product("s2", 400_000, model="X2")
    log.price("s2", 400_000, 600_000, T0 + days(3))
    log.order(T0 + days(40), sku="s2", price=600_000)  # the low price left the 30-day window
    log.product("s3", 300_000, model="X3")  # another model of the same merchant is no baseline
    log.order(T0 + days(2), sku="s1", price=550_000)
    assert log.findings("price_raise") == []


def test_one_serial_on_two_orders_at_once_or_on_two_platforms_is_found() -> None:
    log = Log()
    log.product("s1", 500_000)
    a = log.order(T0, serial="IMEI-1")
    b = log.order(T0 + days(1), serial="IMEI-1")  # the first was never refunded
    c = log.order(T0, serial="IMEI-2", platform="jd", refund_after=days(1))
    d = log.order(T0 + days(2), serial="IMEI-2", platform="tmall")
    found = {f.subject: f for f in log.findings("shared_serial")}
    assert found["IMEI-1"].reason == "SERIAL_ON_SEVERAL_ORDERS"
    assert dict(found["IMEI-1"].evidence)["orders"] == f"{a},{b}"
    assert found["IMEI-2"].reason == "SERIAL_ON_SEVERAL_PLATFORMS"
    assert dict(found["IMEI-2"].evidence)["orders"] == f"{c},{d}"


def test_a_unit_refunded_and_sold_again_on_the_same_platform_is_not_a_finding() -> None:
    log = Log()
    log.order(T0, serial="IMEI-3", refund_after=days(5))
    log.order(T0 + days(6), serial="IMEI-3")
    assert log.findings("shared_serial") == []


def test_repeated_refunds_right_after_capture_are_found_per_consumer_and_merchant() -> None:
    log = Log()
    quick = [
        log.order(
            T0 + days(i), consumer="c-cash", merchant="m-shop", refund_after=dt.timedelta(hours=2)
        )
        for i in range(3)
    ]
    log.order(T0, consumer="c-slow", refund_after=days(3))  # refunded after the window
    log.order(T0 + days(5), consumer="c-slow", refund_after=days(4))
    log.order(T0, consumer="c-once", refund_after=dt.timedelta(hours=1))  # once is not a habit
    found = {(f.subject_kind, f.subject): f for f in log.findings("quick_refund")}
    assert set(found) == {("consumer", "c-cash"), ("merchant", "m-shop")}
    assert dict(found[("consumer", "c-cash")].evidence)["orders"] == ",".join(quick)


def test_captures_without_evidence_past_the_deadline_are_found_per_merchant() -> None:
    log = Log()
    late = log.order(T0, merchant="m-late", evidence=False)
    log.order(T0, merchant="m-late", evidence=False, refund_after=days(1))  # refunded: owes none
    log.order(T0 + days(50), merchant="m-late", evidence=False)  # not due yet
    log.order(T0, merchant="m-good")
    (found,) = log.findings("missing_evidence", now=T0 + days(45))
    assert (found.subject, dict(found.evidence)["orders"]) == ("m-late", late)


def test_a_merchants_day_that_jumps_against_its_history_and_category_is_found() -> None:
    log = Log()
    for day in range(5):  # m-jump's usual days, and its category's
        for _ in range(5):
            log.order(T0 + days(day), merchant="m-jump", price=300_000)
            log.order(T0 + days(day), merchant="m-peer", price=300_000)
    for _ in range(5):
        log.order(T0 + days(5), merchant="m-jump", price=500_000)  # +67 %: over 1.5x
        log.order(T0 + days(5), merchant="m-peer", price=310_000)
    for day in range(5):  # a refund wave at m-refund, whose peers refund little
        for _ in range(6):
            log.order(T0 + days(day), merchant="m-refund", price=300_000, category="phone")
            log.order(T0 + days(day), merchant="m-calm", price=300_000, category="phone")
    for i in range(10):
        after = dt.timedelta(days=3) if i < 8 else None
        log.order(T0 + days(6), merchant="m-refund", price=300_000, refund_after=after,
                  category="phone")  # fmt: skip
    for i in range(10):  # two refunds in ten at m-calm: more than its usual none, not a wave
        after = dt.timedelta(days=3) if i < 2 else None
        log.order(T0 + days(6), merchant="m-calm", price=300_000, refund_after=after,
                  category="phone")  # fmt: skip
    found = {(f.subject, f.reason) for f in log.findings("merchant_anomaly")}
    assert found == {("m-jump", "AVERAGE_PRICE_JUMP"), ("m-refund", "REFUND_RATE_JUMP")}


def test_findings_are_the_same_whatever_the_logs_arrival_order() -> None:
    log = Log()
    log.product("s1", 500_000)
    log.price("s1", 500_000, 700_000, T0 + days(3))
    log.order(T0 + days(4), price=700_000, serial="IMEI-9")
    log.order(T0 + days(4), price=700_000, serial="IMEI-9")
    now = T0 + days(60)
    assert detect(log.envs, RULES, now) == detect(reversed(log.envs), RULES, now)
    assert {f.detector for f in detect(log.envs, RULES, now)} == {"price_raise", "shared_serial"}


def test_rules_are_data_and_refuse_what_they_do_not_know() -> None:
    assert DetectorRules.from_mapping({"quick_refund_s": 600}).quick_refund_s == 600
    with pytest.raises(ValueError, match="unknown nonsense"):
        DetectorRules.from_mapping({"nonsense": 1})
    with pytest.raises(ValueError, match="serial_min_orders must be"):
        DetectorRules.from_mapping({"serial_min_orders": 0})


def test_the_rules_file_is_read_and_a_bad_one_stops_the_service(tmp_path: Path) -> None:
    good = tmp_path / "rules.yaml"
    good.write_text("quick_refund_s: 3600\nserial_min_orders: 3\n")
    assert rules_from_file(good) == DetectorRules(quick_refund_s=3600, serial_min_orders=3)
    assert rules_from_file(None) == DetectorRules()
    bad = tmp_path / "bad.yaml"
    bad.write_text("- not\n- a mapping\n")
    with pytest.raises(ValueError, match="not a mapping"):
        rules_from_file(bad)
    with pytest.raises(ValueError, match="No such file"):
        rules_from_file(tmp_path / "missing.yaml")


def test_many_people_at_one_delivery_address_is_found_and_a_household_is_not() -> None:
    log = Log()
    drop = [log.order(T0 + days(3 * i), consumer=f"c-{i}", address="addr-drop") for i in range(5)]
    for i in range(3):  # a family of three, ordering often
        for d in range(4):
            log.order(T0 + days(d), consumer=f"family-{i}", address="addr-home")
    for i in range(5):  # five people at one address, but a year apart: not one window
        log.order(T0 + days(40 * i), consumer=f"mover-{i}", address="addr-flat")
    (found,) = log.findings("shared_address", now=T0 + days(400))
    assert (found.subject, found.reason) == ("addr-drop", "MANY_PEOPLE_AT_ONE_ADDRESS")
    assert dict(found.evidence) == {
        "people": "5",
        "orders": ",".join(drop),
        "subsidy_fen": str(5 * 100_000),
    }
