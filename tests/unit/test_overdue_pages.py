"""Pages of ListOverdueEvidence (services/ledger/settlement_domain.py): a cursor after the last
capture examined, so every overdue capture is listed exactly once over the pages, whatever the
page size and however short the scan of one call."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.kernel.errors import InvalidArgument
from services.ledger import settlement_domain as sd

T0 = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
NOW = T0 + dt.timedelta(days=40)


def test_a_page_token_names_the_capture_the_next_page_starts_after() -> None:
    cursor = (T0 + dt.timedelta(microseconds=7), "o-1/2")
    assert sd.cursor_of(sd.page_token(cursor)) == cursor
    assert sd.page_token(None) == "" and sd.cursor_of("") is None
    for bad in ("x", "12", "~o-1", "-5~o-1", "1e9~o", "9" * 19 + "~o", "1~" + "o" * 65, "١٢~o"):
        with pytest.raises(InvalidArgument) as err:
            sd.cursor_of(bad)
        assert (err.value.reason, err.value.field) == ("INVALID_PAGE_TOKEN", "page_token")


@given(
    days=st.lists(st.sampled_from([1, 10, 30, 60]), max_size=30),
    limit=st.integers(1, 7),
    scan=st.integers(1, 9),
)
def test_pages_list_every_overdue_capture_once_in_order(
    days: list[int], limit: int, scan: int
) -> None:
    """A ledger of captures one hour apart, each with its version's evidence days; pages of
    ``limit``, each call scanning at most ``scan`` captures, as the handler does."""
    captures = [
        (sd.Capture(f"o-{i:03}", "m", 100, T0 + dt.timedelta(hours=i)), d)
        for i, d in enumerate(days)
    ]
    expected = [c for c, d in captures if sd.overdue([c], NOW, d)]
    listed: list[sd.Capture] = []
    cursor: sd.Cursor | None = None
    pages: list[list[sd.Capture]] = []
    for _ in range(len(captures) + 2):
        after = [
            x for x in captures if cursor is None or (x[0].captured_at, x[0].order_id) > cursor
        ]
        window = after[:scan]
        page, cursor = sd.overdue_page(window, NOW, limit, complete=len(after) <= scan)
        assert len(page) <= limit
        listed += page
        pages.append(page)
        if cursor is None:
            break
        assert sd.cursor_of(sd.page_token(cursor)) == cursor
    assert cursor is None
    assert listed == expected
    if scan > len(captures):  # every call sees to the end: no empty page, none but the last short
        assert [len(page) for page in pages] == [
            min(limit, len(expected) - i) for i in range(0, max(len(expected), 1), limit)
        ]
