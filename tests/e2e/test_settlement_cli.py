"""`subsidyctl settlement create|approve|export|paid` against the running ledger: the maker
creates, the same person cannot approve, another approver does, the export's CSV and XLSX hold
the batch's lines and net (formula-safe), and the batch is marked paid."""

from __future__ import annotations

import csv
import datetime as dt
import io
import random
from pathlib import Path

import openpyxl

from services.kernel.identity import Caller, Role
from subsidy.v1 import ledger_pb2
from tests.e2e.cli import identity_dir, subsidyctl
from tests.e2e.conftest import Platform
from tests.e2e.test_funding_sources import PHONE_PRICE
from tests.e2e.test_settlement import SUBSIDY, evidence, paid_order


def csv_rows(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"))))


async def test_settlement_commands_create_approve_export_and_mark_paid(
    platform: Platform, rng: random.Random, tmp_path: Path
) -> None:
    p = platform
    pool = await p.pool(rng, 10_000_000)
    sku = await p.product(rng, "phone", 0, PHONE_PRICE)
    merchant = sku.replace("sku-", "m-")
    order = await paid_order(p, pool, sku)
    await evidence(p, order)
    people = {
        who: identity_dir(p.infra.identities(who), tmp_path / who.principal)
        for who in (
            Caller(Role.OPERATOR, "op-li"),
            Caller(Role.APPROVER, "op-li"),
            Caller(Role.APPROVER, "ap-wang"),
        )
    }
    maker, same, checker = people.values()
    address = ("--ledger", f"127.0.0.1:{p.running['ledger'].port}")
    batch = f"sb-{rng.randrange(10**9)}"
    now = dt.datetime.now(dt.UTC)
    start, end = (
        (now - dt.timedelta(hours=1)).isoformat(),
        (now + dt.timedelta(hours=1)).isoformat(),
    )
    create = ("settlement", "create", batch, "--merchant", merchant, "--from", start, "--to", end)
    code, made, err = await subsidyctl(*create, "--reason", "June", *address, identity=maker)
    assert code == 0, err
    assert (made["status"], made["net_fen"], made["lines"]) == (
        "CREATED",
        SUBSIDY,
        [{"order_id": order, "subsidy_fen": SUBSIDY}],
    )
    code, _, err = await subsidyctl("settlement", "export", batch, *address, identity=maker)
    assert code != 0 and "not approved" in err
    approve = ("settlement", "approve", batch, "--reason", "ok", *address)
    code, _, err = await subsidyctl(*approve, identity=same)
    assert code != 0 and "MAKER_CHECKER" in err
    code, approved, err = await subsidyctl(*approve, identity=checker)
    assert code == 0, err
    assert (approved["status"], approved["approved_by"]) == ("APPROVED", "ap-wang")
    out = tmp_path / "export"
    code, exported, err = await subsidyctl(
        "settlement", "export", batch, "--out", str(out), *address, identity=maker
    )
    assert code == 0, err
    table = csv_rows(Path(exported["csv"]))
    assert table == [
        ["batch_id", "merchant_id", "kind", "order_id", "fen"],
        [batch, merchant, "capture", order, str(SUBSIDY)],
        [batch, merchant, "net", "", str(SUBSIDY)],
    ]
    sheet = openpyxl.load_workbook(exported["xlsx"]).active
    assert sheet is not None
    assert [list(r) for r in sheet.iter_rows(values_only=True)][1:] == [
        [batch, merchant, "capture", order, SUBSIDY],
        [batch, merchant, "net", None, SUBSIDY],
    ]
    paid = ("settlement", "paid", batch, "--payment-ref", "xfer-2025-06-01", *address)
    code, done, err = await subsidyctl(*paid, identity=maker)
    assert code == 0, err
    assert (done["status"], done["payment_ref"]) == ("PAID", "xfer-2025-06-01")
    # Refunded after settlement: the returns ledger shows the clawback still owed.
    await p.ledger.ReleaseSubsidy(
        ledger_pb2.ReleaseSubsidyRequest(order_id=order, reason="REFUNDED")
    )
    returns = ("settlement", "returns", "--merchant", merchant, "--out", str(out), *address)
    code, listed, err = await subsidyctl(*returns, identity=maker)
    assert code == 0, err
    [entry] = listed["returns"]
    assert (entry["order_id"], entry["batch_id"], entry["clawback"]) == (
        order,
        batch,
        "OUTSTANDING",
    )
    rows = csv_rows(Path(listed["csv"]))
    assert rows[1][0] == order and rows[1][-2:] == ["OUTSTANDING", ""]
    overdue = ("settlement", "overdue", "--merchant", merchant, *address)
    code, late, err = await subsidyctl(*overdue, identity=maker)
    assert code == 0, err
    assert late == {"overdue": 0, "captures": []}
