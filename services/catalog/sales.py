"""The sales ledger (销售台账): captured and refunded subsidies per merchant and product.

It is a query over ``sales_orders``, the projection of the ledger's SubsidyReserved /
SubsidyCaptured / SubsidyReleased events, joined with the products' brand and model. The
projection can be dropped and rebuilt from the events alone (:func:`rebuild`), replaying them
from JetStream while the live consumer keeps running: each event merges into its order's row
monotonically, so the two never disagree.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import astuple, dataclass, fields
from typing import Final

import nats
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from sqlalchemy import delete, text

from services.kernel.bus import EVENTS_STREAM
from services.kernel.contract.spreadsheet import XLSX_TYPE, csv_bytes, xlsx_bytes
from services.kernel.errors import InvalidArgument
from services.kernel.events import Envelope
from services.kernel.eventstore import EventStore

from .projections import LEDGER_SUBJECTS, apply_ledger_event, sales_orders

log = logging.getLogger(__name__)

FORMATS: Final = ("csv", "xlsx")


@dataclass(frozen=True)
class SalesRow:
    merchant_id: str
    sku: str
    category: str
    brand: str
    model: str
    sold_units: int
    sales_fen: int
    subsidy_fen: int
    refunded_units: int
    refunded_sales_fen: int
    refunded_subsidy_fen: int

    @property
    def net_units(self) -> int:
        return self.sold_units - self.refunded_units

    @property
    def net_subsidy_fen(self) -> int:
        return self.subsidy_fen - self.refunded_subsidy_fen


HEADERS: Final = (
    "商户编号 merchant_id",
    "商品编码 sku",
    "品类 category",
    "品牌 brand",
    "型号 model",
    "售出件数 sold_units",
    "销售额(分) sales_fen",
    "补贴额(分) subsidy_fen",
    "退货件数 refunded_units",
    "退货金额(分) refunded_sales_fen",
    "退回补贴(分) refunded_subsidy_fen",
    "净售出件数 net_units",
    "净补贴(分) net_subsidy_fen",
)

_LEDGER = text(
    """
    SELECT o.merchant_id, o.sku, o.category,
           coalesce(p.brand, '') AS brand, coalesce(p.model, '') AS model,
           count(*) FILTER (WHERE o.captured) AS sold_units,
           coalesce(sum(o.unit_price_fen) FILTER (WHERE o.captured), 0)::bigint AS sales_fen,
           coalesce(sum(o.subsidy_fen) FILTER (WHERE o.captured), 0)::bigint AS subsidy_fen,
           count(*) FILTER (WHERE o.refunded) AS refunded_units,
           coalesce(sum(o.unit_price_fen) FILTER (WHERE o.refunded), 0)::bigint
               AS refunded_sales_fen,
           coalesce(sum(o.subsidy_fen) FILTER (WHERE o.refunded), 0)::bigint AS refunded_subsidy_fen
    FROM sales_orders o
    LEFT JOIN products p ON p.sku = o.sku
    WHERE o.captured AND (:merchant_id = '' OR o.merchant_id = :merchant_id)
    GROUP BY o.merchant_id, o.sku, o.category, p.brand, p.model
    ORDER BY o.merchant_id, o.sku
    """
)


async def ledger_rows(store: EventStore, merchant_id: str = "") -> list[SalesRow]:
    """The sales ledger, by merchant then SKU; only orders that were ever captured count."""
    async with store.engine.connect() as conn:
        result = await conn.execute(_LEDGER, {"merchant_id": merchant_id})
        return [SalesRow(*(r[i] for i in range(len(fields(SalesRow))))) for r in result]


def _cells(row: SalesRow) -> list[object]:
    return [*astuple(row), row.net_units, row.net_subsidy_fen]


def to_csv(rows: list[SalesRow]) -> bytes:
    """UTF-8 with a byte-order mark, so spreadsheet programs show the Chinese headers; brand
    and model are typed by merchants, so every cell is neutralised (formula-safe)."""
    return csv_bytes(HEADERS, (_cells(r) for r in rows))


def to_xlsx(rows: list[SalesRow]) -> bytes:
    """One sheet, every text cell a string, never a formula."""
    return xlsx_bytes([("销售台账", HEADERS, (_cells(r) for r in rows))])


def export(rows: list[SalesRow], fmt: str) -> tuple[bytes, str, str]:
    """(content, content type, file name) of the ledger in ``fmt``."""
    fmt = fmt.strip().lower() or "csv"
    if fmt not in FORMATS:
        raise InvalidArgument("INVALID_CHOICE", "format: one of csv, xlsx", field="format")
    if fmt == "csv":
        return to_csv(rows), "text/csv; charset=utf-8", "sales-ledger.csv"
    return to_xlsx(rows), XLSX_TYPE, "sales-ledger.xlsx"


async def rebuild(store: EventStore, js: JetStreamContext, *, batch: int = 500) -> int:
    """Drop the sales orders and replay every ledger reservation event from JetStream.

    Runs in one transaction, so readers see the old projection until the new one commits.
    Returns how many events were replayed.
    """
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        filter_subjects=list(LEDGER_SUBJECTS),
        inactive_threshold=60.0,
    )
    sub = await js.pull_subscribe("", stream=EVENTS_STREAM, config=config)
    replayed = 0
    try:
        async with store.transaction() as tx:
            await tx.conn.execute(delete(sales_orders))
            while True:
                try:
                    msgs = await sub.fetch(batch=batch, timeout=1.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    msgs = []
                for msg in msgs:
                    await apply_ledger_event(tx.conn, Envelope.FromString(msg.data))
                    replayed += 1
                if not msgs and (await sub.consumer_info()).num_pending == 0:
                    break
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    log.info("sales ledger rebuilt from %d ledger events", replayed)
    return replayed
