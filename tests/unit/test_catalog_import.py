"""CSV parsing and row validation of the bulk import, without a database."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.catalog.domain import Product
from services.catalog.importer import parse_file, read_rows
from services.kernel.contract.policy import default_policy
from services.kernel.errors import InvalidArgument

POLICY = default_policy()


def parse(
    text: str, merchants: tuple[str, ...] = ("m1",), existing: tuple[str, ...] = ()
) -> list[tuple[int, str, str]]:
    columns, rows = read_rows(text.encode())
    registered = {s: Product(s, "m1", "tv", 1, "b", "m", "", 1, "LISTED") for s in existing}
    parsed = parse_file(POLICY, columns, rows, merchants, registered)
    return [(e.line, e.field, e.reason) for e in parsed.errors]


def test_chinese_headers_with_full_width_parentheses_and_yuan() -> None:
    columns, rows = read_rows(
        "商品编码,商户编号,品类,能效等级,品牌,型号,价格（元）\ns1,m1,电视机,一级,TCL,X,1999.9\n".encode()
    )
    parsed = parse_file(POLICY, columns, rows, ["m1"], {})
    assert parsed.errors == []
    [(line, event)] = parsed.good
    assert (line, event.category, event.grade, event.list_price_fen) == (2, "tv", 1, 199_990)


@pytest.mark.parametrize(
    ("grade", "expected"),
    [("", 0), ("0", 0), ("无", 0), ("1", 1), ("2级", 2), ("三级", 3), ("5 级", 5)],
)
def test_grade_spellings(grade: str, expected: int) -> None:
    columns, rows = read_rows(
        f"sku,merchant_id,category,grade,brand,model,list_price_fen\ns,m1,tv,{grade},b,m,1\n".encode()
    )
    parsed = parse_file(POLICY, columns, rows, ["m1"], {})
    assert [e.grade for _, e in parsed.good] == [expected]


@pytest.mark.parametrize(
    ("price_column", "value", "reason_field"),
    [
        ("list_price_fen", "12.5", "list_price_fen"),
        ("list_price_fen", "1e5", "list_price_fen"),
        ("list_price_fen", "0", "list_price_fen"),
        ("list_price_yuan", "1.234", "list_price_yuan"),
        ("list_price_yuan", "-1", "list_price_yuan"),
        ("list_price_yuan", "1,000", "list_price_yuan"),
    ],
)
def test_bad_prices_name_their_column(price_column: str, value: str, reason_field: str) -> None:
    text = f'sku,merchant_id,category,brand,model,{price_column}\ns,m1,tv,b,m,"{value}"\n'
    assert parse(text) == [(2, reason_field, "INVALID_PRICE")]


def test_existing_skus_and_unknown_merchants_are_row_errors() -> None:
    text = "sku,merchant_id,category,brand,model,list_price_fen\ns1,m1,tv,b,m,1\ns2,m9,tv,b,m,1\n"
    assert parse(text, existing=("s1",)) == [
        (2, "sku", "PRODUCT_EXISTS"),
        (3, "merchant_id", "UNKNOWN_MERCHANT"),
    ]


def test_line_numbers_count_physical_lines() -> None:
    text = (
        "sku,merchant_id,category,brand,model,list_price_fen\r\n"
        's1,m1,tv,"two\r\nlines",m,1\r\n'  # lines 2-3
        "\r\n"  # line 4, blank
        "s2,m1,tv,b,m,x\r\n"  # line 5
    )
    assert parse(text) == [(2, "brand", "INVALID_TEXT"), (5, "list_price_fen", "INVALID_PRICE")]


def test_whole_file_problems_raise() -> None:
    with pytest.raises(InvalidArgument) as err:
        read_rows(b"sku;merchant_id\n")
    assert (err.value.reason, err.value.field) == ("UNKNOWN_COLUMN", "csv")


@given(st.binary(max_size=300))
def test_any_bytes_either_parse_or_raise_invalid_argument(data: bytes) -> None:
    try:
        columns, rows = read_rows(data)
    except InvalidArgument as err:
        assert err.field == "csv"
        return
    parse_file(POLICY, columns, rows, [], {})
