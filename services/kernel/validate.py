"""Request validation shared by every API: a precise INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import datetime as dt
import re

from google.protobuf.timestamp_pb2 import Timestamp

from services.kernel.contract import order_line
from services.kernel.contract.limits import MAX_PRICE_FEN, MIN_PRICE_FEN

from .errors import InvalidArgument

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]*$")


def identifier(field: str, value: str, *, max_len: int = 64) -> str:
    """A non-empty ASCII identifier (order ids, SKUs, pool ids) of at most ``max_len``."""
    if not value:
        raise InvalidArgument("MISSING_FIELD", f"{field}: required", field=field)
    if len(value) > max_len:
        raise InvalidArgument(
            "FIELD_TOO_LONG", f"{field}: at most {max_len} characters", field=field
        )
    if not _ID.fullmatch(value):  # not match(): its "$" also matches before a final newline
        raise InvalidArgument(
            "INVALID_IDENTIFIER",
            f"{field}: letters, digits and . _ : - only, starting with a letter or digit",
            field=field,
        )
    return value


def item(field: str, value: str, order_id: str) -> str:
    """An item of a multi-item order ("" for the whole order): an identifier of at most
    MAX_ITEM_LEN characters, and ``order_id/item`` fits where order ids are stored."""
    if not value:
        return ""
    identifier(field, value, max_len=order_line.MAX_ITEM_LEN)
    if len(order_line.line_of(order_id, value)) > order_line.MAX_LINE_LEN:
        raise InvalidArgument(
            "FIELD_TOO_LONG",
            f"{field}: order_id, '/' and item together at most {order_line.MAX_LINE_LEN}"
            " characters",
            field=field,
        )
    return value


def line(field: str, value: str) -> str:
    """A reservation's key as one service passes it to another: an order id, or
    ``order_id/item`` (services.kernel.contract.order_line)."""
    order_id, sep, rest = value.partition(order_line.SEP)
    identifier(field, order_id)
    if sep:
        identifier(field, rest, max_len=order_line.MAX_ITEM_LEN)  # "order/" names no item
        item(field, rest, order_id)
    return value


def price_fen(field: str, value: int) -> int:
    if value < MIN_PRICE_FEN or value > MAX_PRICE_FEN:
        raise InvalidArgument(
            "INVALID_PRICE", f"{field}: must be {MIN_PRICE_FEN}..{MAX_PRICE_FEN} fen", field=field
        )
    return value


def text_field(field: str, value: str, *, max_len: int = 200, required: bool = True) -> str:
    value = value.strip()
    if required and not value:
        raise InvalidArgument("MISSING_FIELD", f"{field}: required", field=field)
    if len(value) > max_len:
        raise InvalidArgument(
            "FIELD_TOO_LONG", f"{field}: at most {max_len} characters", field=field
        )
    if any(ord(c) < 32 for c in value):
        raise InvalidArgument("INVALID_TEXT", f"{field}: control characters", field=field)
    return value


def choice(field: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise InvalidArgument(
            "INVALID_CHOICE", f"{field}: one of {', '.join(allowed)}", field=field
        )
    return value


# Dropped from a serial / IMEI: the separators people and scanners put between groups of
# characters. Anything else that is not a letter or digit is refused by identifier().
_SERIAL_SEPARATORS = frozenset(" -._:")


def serial(field: str, value: str) -> str:
    """A unit's serial number / IMEI in one canonical form, so that ``abc-123``, ``ABC.123``,
    ``abc_1:23`` and ``ABC123`` are the same unit (one subsidy per unit): blanks and the
    separators ``- . _ :`` dropped, letters upper-cased.

    Only ASCII is accepted, and checked before upper-casing: ``str.upper`` maps some non-ASCII
    letters onto ASCII ones (``ß`` to ``SS``, ``ı`` to ``I``, ``ﬀ`` to ``FF``), which would give
    one unit a second spelling that survives canonicalisation."""
    stripped = value.strip()
    if not stripped.isascii():
        raise InvalidArgument(
            "INVALID_IDENTIFIER",
            f"{field}: ASCII letters and digits only (separators - . _ : and blanks are ignored)",
            field=field,
        )
    canonical = "".join(c for c in stripped.upper() if c not in _SERIAL_SEPARATORS)
    return identifier(field, canonical, max_len=64)


def timestamp(field: str, value: Timestamp) -> dt.datetime:
    """A request's ``google.protobuf.Timestamp`` as an aware UTC datetime.

    Any seconds and nanos decode off the wire, but only 0001-01-01 to 9999-12-31 with nanos
    in 0..999,999,999 is a time: protobuf's ``ToDatetime`` raises ``ValueError`` on the rest,
    which a caller must see as its own mistake, not the server's."""
    try:
        return value.ToDatetime(tzinfo=dt.UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument(
            "INVALID_TIME", f"{field}: not a valid timestamp", field=field
        ) from None
