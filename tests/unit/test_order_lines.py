"""Multi-item orders (services/kernel/contract/order_line.py, services/ledger/domain.py): one
reservation, and one qualification, per item, keyed ``order_id/item``; a whole order keyed by
its id alone, exactly as before items existed."""

from __future__ import annotations

import datetime as dt

import pytest

from services.kernel import validate
from services.kernel.contract import order_line
from services.kernel.contract.budget import Pool
from services.kernel.errors import AlreadyExists, InvalidArgument, NotFound
from services.ledger import domain, reconcile
from subsidy.v1 import events_pb2 as ev

T0 = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)


def _reserve(order_id: str, item: str = "", platform: str = "p-1") -> domain.Reserve:
    return domain.Reserve(
        order_line.line_of(order_id, item), platform, "pool", "c", "q", "sku", 100, item=item
    )


def test_a_whole_order_is_keyed_by_its_id_and_an_item_by_order_slash_item() -> None:
    assert order_line.line_of("o-1") == "o-1"
    assert order_line.line_of("o-1", "2") == "o-1/2"
    assert order_line.split_line("o-1/2") == ("o-1", "2")
    assert order_line.split_line("o-1") == ("o-1", "")
    assert order_line.order_of("o-1/2") == order_line.order_of("o-1") == "o-1"


def test_an_item_is_a_short_identifier_and_the_line_fits_where_order_ids_are_stored() -> None:
    assert validate.item("item", "", "o-1") == ""
    assert validate.item("item", "line-3", "o-1") == "line-3"
    for bad, reason in (("a/b", "INVALID_IDENTIFIER"), ("x" * 17, "FIELD_TOO_LONG")):
        with pytest.raises(InvalidArgument) as err:
            validate.item("item", bad, "o-1")
        assert (err.value.reason, err.value.field) == (reason, "item")
    with pytest.raises(InvalidArgument) as err:
        validate.item("item", "12345", "o" * 60)  # 60 + 1 + 5 > 64
    assert (err.value.reason, err.value.field) == ("FIELD_TOO_LONG", "item")
    # What the ledger passes eligibility: an order, or its item's line; nothing else.
    assert validate.line("order_id", "o-1/2") == "o-1/2"
    for bad in ("o-1/", "o-1/2/3", "/2"):
        with pytest.raises(InvalidArgument):
            validate.line("order_id", bad)


def test_a_call_names_the_whole_order_or_exactly_one_of_its_items() -> None:
    whole = frozenset({"o-1"})
    items = frozenset({"o-2/1", "o-2/2", "o-2/3"})
    assert domain.locate("o-1", "", whole) == "o-1"
    assert domain.locate("o-2", "2", items) == "o-2/2"
    with pytest.raises(NotFound) as err:
        domain.locate("o-9", "", frozenset())
    assert (err.value.reason, err.value.field) == ("UNKNOWN_ORDER", "order_id")
    with pytest.raises(NotFound) as err:
        domain.locate("o-9", "1", frozenset())  # an item of an order the ledger never saw
    assert (err.value.reason, err.value.field) == ("UNKNOWN_ORDER", "order_id")
    with pytest.raises(NotFound) as err:
        domain.locate("o-2", "9", items)  # an item the order does not have
    assert (err.value.reason, err.value.field) == ("UNKNOWN_ITEM", "item")
    with pytest.raises(NotFound) as err:
        domain.locate("o-1", "1", whole)  # a whole order has no items
    assert (err.value.reason, err.value.field) == ("UNKNOWN_ITEM", "item")
    with pytest.raises(InvalidArgument) as required:
        domain.locate("o-2", "", items)  # one call settles one item
    assert (required.value.reason, required.value.field) == ("ITEM_REQUIRED", "item")
    assert "1, 2, 3" in str(required.value)


def test_an_order_is_reserved_whole_or_item_by_item_never_both_and_by_one_platform() -> None:
    domain.new_line(_reserve("o-1"), {})
    domain.new_line(_reserve("o-2", "1"), {})
    domain.new_line(_reserve("o-2", "2"), {"o-2/1": "p-1"})
    for cmd, lines in (
        (_reserve("o-1", "1"), {"o-1": "p-1"}),  # an item of a whole order
        (_reserve("o-2"), {"o-2/1": "p-1"}),  # the whole of an itemised order
        (_reserve("o-2", "2", platform="p-2"), {"o-2/1": "p-1"}),  # another platform's order
    ):
        with pytest.raises(AlreadyExists) as err:
            domain.new_line(cmd, lines)
        assert err.value.reason == "ORDER_ID_REUSED"


def test_each_item_reservation_records_its_item_and_its_own_qualification() -> None:
    cmd = domain.Reserve("o-2/3", "p-1", "pool", "c", "q-3", "sku", 100_000, item="3")
    pool = Pool("pool", funded=1_000_000, available=1_000_000)
    [reserved] = domain.hold(
        domain.Hold(pool, refused=False), cmd, domain.Item("m", "phone", 15_000, "v1"), T0
    )
    assert isinstance(reserved, ev.SubsidyReserved)
    assert (reserved.order_id, reserved.item, reserved.qualification_id) == ("o-2/3", "3", "q-3")


def test_the_bill_lists_an_order_once_with_the_discount_of_all_its_items() -> None:
    items = [
        reconcile.Capture("o-2", "pay-1", 15_000, T0 + dt.timedelta(minutes=1)),
        reconcile.Capture("o-2", "pay-1", 30_000, T0, refunded=True),
        reconcile.Capture("o-2", "pay-1", 7_500, T0 + dt.timedelta(minutes=2)),
    ]
    order = reconcile.order_capture(items)
    # Partly refunded: still owed in the bill at the discount of its payment.
    assert (order.order_id, order.subsidy_fen, order.captured_at, order.refunded) == (
        "o-2",
        52_500,
        T0,
        False,
    )
    every = reconcile.order_capture([reconcile.Capture("o-2", "p", 1, T0, refunded=True)] * 2)
    assert every.refunded
    whole = reconcile.Capture("o-1", "pay-9", 45_000, T0)
    assert reconcile.order_capture([whole]) == whole  # a whole order exactly as before
