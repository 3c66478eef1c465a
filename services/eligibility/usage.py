"""``UsageService``: what eligibility has issued, read-only, for the auditor's replay.

``subsidyctl audit verify`` rebuilds each category's daily quota usage and each person's
qualifications per category from the events in the audit log alone and compares them with
these figures, which come from eligibility's own read models (``quota_usage``,
``qualifications`` joined with ``consumers`` for the person's ID-number blind index). Paged in
key order with an opaque cursor; never a personal datum, only blind indexes.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any, Final

from sqlalchemy import text

from services.kernel.errors import InvalidArgument
from services.kernel.eventstore import EventStore
from services.kernel.rpc import ServicerContext
from subsidy.v1 import usage_pb2, usage_pb2_grpc

DEFAULT_LIMIT: Final = 500
MAX_LIMIT: Final = 1000
_MAX_CURSOR: Final = 600

_QUOTAS = text(
    "SELECT category, day, issued FROM quota_usage WHERE (category, day) > (:a, :b) "
    "ORDER BY category, day LIMIT :limit"
)
_PERSONS = text(
    """
    SELECT person, category, jsonb_object_agg(status, n) FROM (
        SELECT c.id_number_index AS person, q.category, q.status, count(*) AS n
        FROM qualifications q JOIN consumers c ON c.consumer_id = q.consumer_id
        GROUP BY 1, 2, 3
    ) counted
    WHERE (person, category) > (:a, :b)
    GROUP BY person, category ORDER BY person, category LIMIT :limit
    """
)


def _cursor(value: str) -> tuple[str, str]:
    """The key a cursor resumes after (``""`` is the start)."""
    if not value:
        return "", ""
    try:
        if len(value) > _MAX_CURSOR:
            raise ValueError
        key = json.loads(base64.urlsafe_b64decode(value.encode()))
        if not (isinstance(key, list) and len(key) == 2 and all(isinstance(k, str) for k in key)):
            raise ValueError
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument(
            "INVALID_CURSOR", "cursor: a next_cursor this service returned", field="cursor"
        ) from None
    return key[0], key[1]


def _next(rows: Sequence[Any], limit: int) -> str:
    if len(rows) < limit:
        return ""
    return base64.urlsafe_b64encode(json.dumps([rows[-1][0], rows[-1][1]]).encode()).decode()


def _limit(value: int) -> int:
    if value == 0:
        return DEFAULT_LIMIT
    if not 1 <= value <= MAX_LIMIT:
        raise InvalidArgument("INVALID_LIMIT", f"limit: 1..{MAX_LIMIT}", field="limit")
    return value


class UsageApi(usage_pb2_grpc.UsageServiceServicer):
    """Eligibility's quota and per-person figures, as its read models hold them."""

    def __init__(self, store: EventStore) -> None:
        self.store = store

    async def ListQuotaUsage(
        self, request: usage_pb2.ListUsageRequest, context: ServicerContext
    ) -> usage_pb2.QuotaUsagePage:
        after, limit = _cursor(request.cursor), _limit(request.limit)
        async with self.store.engine.connect() as conn:
            rows = (
                await conn.execute(_QUOTAS, {"a": after[0], "b": after[1], "limit": limit})
            ).all()
        return usage_pb2.QuotaUsagePage(
            rows=[usage_pb2.QuotaUsage(category=r[0], day=r[1], issued=int(r[2])) for r in rows],
            next_cursor=_next(rows, limit),
        )

    async def ListPersonUsage(
        self, request: usage_pb2.ListUsageRequest, context: ServicerContext
    ) -> usage_pb2.PersonUsagePage:
        after, limit = _cursor(request.cursor), _limit(request.limit)
        async with self.store.engine.connect() as conn:
            rows = (
                await conn.execute(_PERSONS, {"a": after[0], "b": after[1], "limit": limit})
            ).all()
        return usage_pb2.PersonUsagePage(
            rows=[
                usage_pb2.PersonUsage(
                    id_number_index=r[0],
                    category=r[1],
                    by_status={k: int(v) for k, v in r[2].items()},
                )
                for r in rows
            ],
            next_cursor=_next(rows, limit),
        )
