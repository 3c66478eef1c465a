"""Exports people open in a spreadsheet program (Excel, WPS): CSV and XLSX that show every
cell and never run one.

Shared by every export (the catalog's sales ledger, the ledger's reconciliation report): text
that reaches these files comes from merchants, platforms and payment providers, and an auditor
opens it on their own machine.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import zipfile
from collections.abc import Iterable, Sequence
from typing import Final

XLSX_TYPE: Final = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"

# A text cell a spreadsheet would run as a formula (OWASP, "CSV Injection"). Tab and CR too:
# some programs drop them and read what follows as the cell's start.
_FORMULA_TRIGGERS: Final = ("=", "+", "-", "@", "\t", "\r")


def neutralise(cell: object) -> object:
    """``cell`` as a spreadsheet shows it, never runs it: a string starting with a formula
    trigger gets a leading ``'`` (text, per OWASP's guidance); numbers stay numbers."""
    if isinstance(cell, str) and cell.startswith(_FORMULA_TRIGGERS):
        return "'" + cell
    return cell


def csv_bytes(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> bytes:
    """UTF-8 with a byte-order mark (so spreadsheet programs show Chinese headers), CRLF lines,
    every cell neutralised."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(headers)
    for row in rows:
        writer.writerow([neutralise(c) for c in row])
    return out.getvalue().encode("utf-8-sig")


Sheet = tuple[str, Sequence[str], Iterable[Sequence[object]]]  # (title, headers, rows)


def xlsx_bytes(sheets: Sequence[Sheet], *, created: dt.datetime | None = None) -> bytes:
    """A workbook of ``sheets``; every text cell is written as a string, never as a formula
    (openpyxl writes a string starting with ``=`` as one), on top of :func:`neutralise`.

    ``created`` (UTC) makes the bytes a function of the rows alone: the workbook's created and
    modified dates and every zip member's time are that instant (see :func:`_pinned`)."""
    from openpyxl import Workbook
    from openpyxl.cell import WriteOnlyCell

    book = Workbook(write_only=True)
    for title, headers, rows in sheets:
        sheet = book.create_sheet(title)
        sheet.append(list(headers))
        for row in rows:
            cells = []
            for value in (neutralise(c) for c in row):
                cell = WriteOnlyCell(sheet, value=value)
                if isinstance(value, str):
                    cell.data_type = "s"
                cells.append(cell)
            sheet.append(cells)
    out = io.BytesIO()
    book.save(out)
    return out.getvalue() if created is None else _pinned(out.getvalue(), created)


_CORE_DATES: Final = re.compile(rb"(<dcterms:(?:created|modified)[^>]*>)[^<]*(</dcterms:)")


def _pinned(data: bytes, at: dt.datetime) -> bytes:
    """The workbook ``data`` with its clock readings replaced by ``at``. openpyxl stamps the
    save's wall-clock time into docProps/core.xml (``save_workbook`` overwrites ``modified``)
    and zipfile stamps each member it writes, and neither takes a time to use instead; so the
    archive is rewritten member by member, in the same order, with the same compression."""
    stamp = at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ").encode()
    when = at.astimezone(dt.UTC).timetuple()[:6]
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(data)) as source,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target,
    ):
        for member in source.infolist():
            body = source.read(member)
            if member.filename == "docProps/core.xml":
                body = _CORE_DATES.sub(rb"\g<1>" + stamp + rb"\g<2>", body)
            info = zipfile.ZipInfo(member.filename, date_time=when)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = member.external_attr
            target.writestr(info, body)
    return out.getvalue()
