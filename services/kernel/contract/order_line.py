"""Which reservation a checkout call names: a whole order, or one item of a multi-item order.

One qualification pays one item. A single-item order is reserved, captured and released by its
``order_id`` alone, as it always was. A multi-item order is one reservation per item, each with
its own qualification, budget parts, evidence, settlement line and clawback: the reservation's
key (its *line*) is ``order_id/item``. ``/`` never occurs in an identifier, so a line can never
be mistaken for another order's id, and an event's ``order_id`` (the line) tells which order it
belongs to without a look-up. Every service keys reservations by the line unchanged; only the
discount bill, which the payment provider writes per order, adds the lines of an order up.

Pure: no I/O.
"""

from __future__ import annotations

SEP = "/"
MAX_ITEM_LEN = 16  # an item's name within its order: its line number or the platform's line id
MAX_LINE_LEN = 64  # what every service stores an order id in


def line_of(order_id: str, item: str = "") -> str:
    """The key of the reservation: ``order_id`` for a whole order, ``order_id/item`` for one
    item of a multi-item order."""
    return f"{order_id}{SEP}{item}" if item else order_id


def split_line(line: str) -> tuple[str, str]:
    """``(order_id, item)`` of a reservation's key (item "" for a whole order)."""
    order_id, _, item = line.partition(SEP)
    return order_id, item


def order_of(line: str) -> str:
    """The platform's order id a reservation belongs to (what the discount bill lists)."""
    return split_line(line)[0]


def lines_prefix(order_id: str) -> str:
    """What every item line of ``order_id`` starts with."""
    return f"{order_id}{SEP}"
