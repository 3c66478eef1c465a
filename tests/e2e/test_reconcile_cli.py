"""``subsidyctl reconcile``: the discount bill from the command line, as an operator runs it,
against captures made through the real checkout; the report files; a re-import; a malformed
bill; a caller who may not reconcile; ``reconciliations`` for auditors."""

from __future__ import annotations

import csv
import hashlib
import io
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

from openpyxl import load_workbook

from services.kernel.identity import Caller, Role
from subsidy.v1 import ledger_pb2
from tests.e2e.cli import identity_dir, subsidyctl
from tests.e2e.conftest import Platform
from tests.e2e.test_reconciliation import HEADER, PHONE_SUBSIDY, checkout


async def test_reconcile_a_bill_from_the_command_line(
    platform: Platform, rng: random.Random, tmp_path: Path
) -> None:
    p = platform
    ledger = ("--ledger", f"127.0.0.1:{p.running['ledger'].port}")
    operator, auditor = (
        identity_dir(p.infra.identities(who), tmp_path / who.principal)
        for who in (Caller(Role.OPERATOR, "zhao"), Caller(Role.AUDITOR, "qian"))
    )
    pool = await p.pool(rng, 1_000_000)
    sku = await p.product(rng, "phone", 0, 300_000)
    # Earlier tests captured before this instant, so the period holds this test's captures.
    start = datetime.now(UTC)
    paid = await checkout(p, rng, pool, sku, "pay-a")
    unlisted = await checkout(p, rng, pool, sku, "pay-b")
    end = datetime.now(UTC)
    at = (start + timedelta(milliseconds=200)).astimezone().isoformat()
    bill = tmp_path / "bill.csv"
    bill.write_bytes(
        (
            "\ufeff"
            + HEADER
            + f"{paid},pay-a,{PHONE_SUBSIDY + 100},{at}\n"
            + f'rc-cli-{rng.randrange(10**9)},=HYPERLINK("http://x"),500,{at}\n'
        ).encode()
    )
    period = ("--from", start.isoformat(), "--to", end.isoformat())
    prefix = str(tmp_path / "report")
    args = ("reconcile", str(bill), *period, "--report", prefix, *ledger)
    code, answer, err = await subsidyctl(*args, identity=operator)
    assert code == 1, err  # the bill and the ledger disagree
    sha = hashlib.sha256(bill.read_bytes()).hexdigest()
    assert {k: answer[k] for k in ("matched", "amount_mismatch", "missing_in_ledger")} == {
        "matched": 0,
        "amount_mismatch": 1,
        "missing_in_ledger": 1,
    }
    assert (answer["missing_in_bill"], answer["duplicate"], answer["file_sha256"]) == (1, 0, sha)
    assert (answer["bill_total_fen"], answer["ledger_total_fen"]) == (
        PHONE_SUBSIDY + 100 + 500,
        2 * PHONE_SUBSIDY,
    )
    assert answer["fen"]["amount_mismatch"] == {
        "bill_fen": PHONE_SUBSIDY + 100,
        "ledger_fen": PHONE_SUBSIDY,
    }
    assert (answer["already_reconciled"], answer["reconciled_by"], answer["period_given"]) == (
        False,
        "zhao",
        True,
    )
    assert "validate:" in err and "done:" in err  # the progress, on stderr

    # The report: the lines as CSV (BOM, formula-safe) and XLSX (lines and a summary).
    report_csv, report_xlsx = tmp_path / "report.csv", tmp_path / "report.xlsx"
    assert (answer["report_csv"], answer["report_xlsx"]) == (str(report_csv), str(report_xlsx))
    raw = report_csv.read_bytes()
    assert raw.startswith("\ufeff".encode())
    lines = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
    assert lines[0][:3] == ["差异类型 kind", "账单行号 line", "订单号 order_id"]
    assert [(r[0].split()[-1], r[2]) for r in lines[1:]] == [
        ("AMOUNT_MISMATCH", paid),
        ("MISSING_IN_LEDGER", lines[2][2]),
        ("MISSING_IN_BILL", unlisted),
    ]
    assert lines[1][5:8] == [str(PHONE_SUBSIDY + 100), str(PHONE_SUBSIDY), "100"]
    assert lines[2][3] == '\'=HYPERLINK("http://x")'  # shown, never run
    book = load_workbook(report_xlsx, read_only=True)
    sheet = book["差异明细 discrepancies"]
    cells = [list(r) for r in sheet.iter_rows(values_only=True)]
    assert len(cells) == 4 and cells[2][3] == '\'=HYPERLINK("http://x")'
    summary = {r[0]: r[1:] for r in book["汇总 summary"].iter_rows(values_only=True)}
    assert summary["金额不符 amount_mismatch"] == (1, PHONE_SUBSIDY + 100, PHONE_SUBSIDY)

    # The same file again: the same answer, nothing recorded.
    code2, again, err2 = await subsidyctl(*args, identity=operator)
    assert code2 == 1 and again["already_reconciled"] and "reconciled before" in err2
    assert {k: v for k, v in again.items() if k != "already_reconciled"} == {
        k: v for k, v in answer.items() if k != "already_reconciled"
    }
    events = await p.running["ledger"].runtime.store.read_stream(f"discount-bill/{sha}")
    assert len(events) == 1

    # Auditors read it back, and may write its report again.
    code, shown, _ = await subsidyctl(
        "reconciliations", sha, "--report", str(tmp_path / "again"), *ledger, identity=auditor
    )
    assert code == 0 and shown["lines_sha256"] == answer["lines_sha256"]
    assert shown["report_csv"] == str(tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_bytes() == raw
    code, newest, _ = await subsidyctl(
        "reconciliations", "--limit", "1", *ledger, identity=auditor
    )  # one JSON object per line, newest first
    assert code == 0 and newest["file_sha256"] == sha
    assert newest == {k: v for k, v in shown.items() if not k.startswith("report_")}

    # An auditor may not reconcile.
    code, refused, err = await subsidyctl("reconcile", str(bill), *ledger, identity=auditor)
    assert (code, refused) == (2, {}) and '"reason": "ROLE_NOT_ALLOWED"' in err


async def test_a_malformed_bill_from_the_command_line_records_nothing(
    platform: Platform, tmp_path: Path
) -> None:
    p = platform
    ledger = ("--ledger", f"127.0.0.1:{p.running['ledger'].port}")
    operator = identity_dir(p.infra.identities(Caller(Role.OPERATOR, "zhao")), tmp_path / "op")
    bill = tmp_path / "bad.csv"
    bill.write_text(HEADER + "o-1,pay-1,100,2025-06-01T10:00:00+08:00\no-2,pay-2,100,tomorrow\n")
    code, answer, err = await subsidyctl("reconcile", str(bill), *ledger, identity=operator)
    assert code == 1
    assert answer["outcome"] == "REJECTED" and answer["rejected_rows"] == 1
    assert [(r["line"], r["column"], r["reason"]) for r in answer["rejected"]] == [
        (3, "paid_at", "INVALID_TIME")
    ]
    assert "line 3: paid_at: INVALID_TIME" in err and "nothing recorded" in err
    sha = hashlib.sha256(bill.read_bytes()).hexdigest()
    assert await p.running["ledger"].runtime.store.read_stream(f"discount-bill/{sha}") == []
    listed = await p.ledger.ListReconciliations(ledger_pb2.ListReconciliationsRequest(limit=500))
    assert sha not in {r.recorded.file_sha256 for r in listed.reconciliations}
    code, _, err = await subsidyctl(
        "reconcile", str(bill), "--from", "2025-06-01T00:00:00", "--to", "x", *ledger,
        identity=operator,
    )  # fmt: skip
    assert code == 2 and "offset" in err
