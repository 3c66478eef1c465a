"""Bulk product import over gRPC: every bad row by line, all-or-nothing unless asked otherwise."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.kernel.events import payload_of
from services.kernel.identity import Caller, Role
from subsidy.v1 import catalog_pb2, common_pb2
from subsidy.v1 import events_pb2 as ev
from tests.e2e.cli import identity_dir, subsidyctl
from tests.e2e.conftest import DEMO_POLICY_VERSION, Platform, status_of
from tests.e2e.test_catalog import OPERATOR, catalog_events, merchant

INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def run_import(
    p: Platform, data: bytes, *, only_good_rows: bool = False, reason: str = "商品目录导入"
) -> list[catalog_pb2.ImportProgress]:
    return [
        msg
        async for msg in p.catalog.ImportProducts(
            catalog_pb2.ImportProductsRequest(
                csv=data, only_good_rows=only_good_rows, actor=OPERATOR, reason=reason
            )
        )
    ]


async def skus_exist(p: Platform, skus: list[str]) -> list[bool]:
    found = []
    for sku in skus:
        try:
            await p.catalog.GetProduct(catalog_pb2.GetProductRequest(sku=sku))
            found.append(True)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
            found.append(False)
    return found


def bad_file(m: str, s: str) -> str:
    # line 1 is the header; a quoted cell spanning two lines makes line numbers honest
    return (
        "商品编码,商户编号,品类,能效等级,品牌,型号,价格（分）\n"
        f"{s}-1,{m},refrigerator,1,海尔,BCD-1,300000\n"  # 2 good
        f"{s}-2,{m},toaster,1,海尔,BCD-2,300000\n"  # 3 unknown category
        f'{s}-3,{m},tv,1,"多行\n品牌",X,300000\n'  # 4-5: one record, a newline in a brand
        f"{s}-4,{m},tv,7,TCL,X,300000\n"  # 6 bad grade
        f"{s}-5,{m},tv,1,TCL,X,-3\n"  # 7 bad price
        f"{s}-1,{m},tv,1,TCL,X,300000\n"  # 8 duplicate of line 2
        f"{s}-6,m-nobody,tv,1,TCL,X,300000\n"  # 9 unknown merchant
        f"{s}-7,{m},tv,1,TCL\n"  # 10 too few cells
        "\n"  # 11 blank: skipped
        f"{s}-8,{m},tv,1,{'B' * 101},X,300000\n"  # 12 oversized field
        f"{s} 9,{m},空气炸锅,,美的,AF,40000\n"  # 13 bad SKU; the category by Chinese name is fine
        f"{s}-10,{m},空气炸锅,无,美的,AF,40000\n"  # 14 good
    )


EXPECTED_ERRORS = [
    (3, "category", "UNKNOWN_CATEGORY"),
    (4, "brand", "INVALID_TEXT"),
    (6, "grade", "INVALID_GRADE"),
    (7, "list_price_fen", "INVALID_PRICE"),
    (8, "sku", "DUPLICATE_SKU"),
    (9, "merchant_id", "UNKNOWN_MERCHANT"),
    (10, "", "WRONG_COLUMN_COUNT"),
    (12, "brand", "FIELD_TOO_LONG"),
    (13, "sku", "INVALID_IDENTIFIER"),
]


async def test_a_file_with_bad_rows_changes_nothing(platform: Platform, rng: random.Random) -> None:
    p = platform
    m = await merchant(p, rng)
    s = f"imp{rng.randrange(10**9)}"
    before = await catalog_events(p)
    progress = await run_import(p, bad_file(m, s).encode())
    result = progress[-1].result
    assert (result.outcome, result.total_rows, result.applied, result.import_id) == (
        "APPLIED_NOTHING",
        11,
        0,
        "",
    )
    assert [(e.line, e.field, e.reason) for e in result.rejected] == EXPECTED_ERRORS
    assert "also on line 2" in result.rejected[4].message
    assert await catalog_events(p) == before
    assert await skus_exist(p, [f"{s}-1", f"{s}-3", f"{s}-10"]) == [False, False, False]


async def test_only_good_rows_applies_them_and_says_so(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    m = await merchant(p, rng)
    s = f"imp{rng.randrange(10**9)}"
    before = await catalog_events(p)
    progress = await run_import(p, bad_file(m, s).encode(), only_good_rows=True)
    result = progress[-1].result
    assert (result.outcome, result.total_rows, result.applied) == ("APPLIED_GOOD_ROWS", 11, 2)
    assert [(e.line, e.reason) for e in result.rejected] == [(x[0], x[2]) for x in EXPECTED_ERRORS]
    assert await catalog_events(p) == before + 3
    assert await skus_exist(p, [f"{s}-1", f"{s}-10", f"{s}-2", f"{s}-3"]) == [
        True,
        True,
        False,
        False,
    ]
    fryer = await p.catalog.GetProduct(catalog_pb2.GetProductRequest(sku=f"{s}-10"))
    assert (fryer.category, fryer.grade, fryer.list_price_fen) == ("air_fryer", 0, 40_000)

    # The import's stream ends with an event naming the lines that were NOT applied.
    store = p.running["catalog"].runtime.store
    envs = await store.read_stream(f"import/{result.import_id}")
    closing = payload_of(envs[-1])
    assert isinstance(closing, ev.ProductsImported)
    assert (list(closing.rejected_lines), closing.only_good_rows, closing.applied) == (
        [x[0] for x in EXPECTED_ERRORS],
        True,
        2,
    )
    assert (envs[-1].actor.id, envs[-1].actor.reason) == ("op-li", "商品目录导入")
    assert len(closing.file_sha256) == 64
    # Each imported product's history is its own stream, as if registered alone.
    assert len(envs) == 1
    for sku in (f"{s}-1", f"{s}-10"):
        [registered] = await store.read_stream(f"product/{sku}")
        event = payload_of(registered)
        assert isinstance(event, ev.ProductRegistered) and event.sku == sku
        assert (registered.stream_version, registered.actor.id) == (1, "op-li")


async def test_a_good_file_applies_every_row_with_english_headers(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    m = await merchant(p, rng)
    s = f"imp{rng.randrange(10**9)}"
    data = (
        "\ufeffsku,merchant_id,category,grade,brand,model,energy_label_code,list_price_yuan\r\n"
        f"{s}-1,{m},phone,,Apple,iPhone,,5999.00\r\n"
        f"{s}-2,{m},washing_machine,2,小天鹅,TG100,CEL2,3299.5\r\n"
    ).encode()
    before = await catalog_events(p)
    progress = await run_import(p, data)
    assert [x.phase for x in progress] == ["VALIDATE", "VALIDATE", "APPLY", "DONE"]
    result = progress[-1].result
    assert (result.outcome, result.applied, list(result.rejected)) == ("APPLIED_ALL", 2, [])
    assert await catalog_events(p) == before + 3
    wm = await p.catalog.GetProduct(catalog_pb2.GetProductRequest(sku=f"{s}-2"))
    assert (wm.list_price_fen, wm.energy_label_code, wm.status) == (329_950, "CEL2", "LISTED")
    v = await p.catalog.VerifyItem(
        catalog_pb2.VerifyItemRequest(sku=f"{s}-1", unit_price_fen=599_900)
    )
    assert (v.eligible, v.subsidy_fen) == (True, 50_000)
    # The same file again: every row exists now, so nothing is applied.
    again = (await run_import(p, data))[-1].result
    assert [(e.line, e.reason) for e in again.rejected] == [
        (2, "PRODUCT_EXISTS"),
        (3, "PRODUCT_EXISTS"),
    ]
    assert again.outcome == "APPLIED_NOTHING"


HEADER = "sku,merchant_id,category,grade,brand,model,list_price_fen\n"


@pytest.mark.parametrize(
    ("data", "reason", "extra"),
    [
        (b"", "EMPTY_CSV", {}),
        (HEADER.encode(), "EMPTY_CSV", {}),
        ((HEADER + "a,b,tv,1,x,y,1\n").encode("utf-16"), "INVALID_ENCODING", {"line": "1"}),
        (
            (HEADER + "a,b,tv,1,x,y,1\n").encode() + b"\xff\xfe,x\n",
            "INVALID_ENCODING",
            {"line": "3"},
        ),
        ((HEADER + 'a,b,tv,1,"x,y,1\n').encode(), "MALFORMED_CSV", {"line": "2"}),
        ((HEADER + "a,b,tv,1,x\x00,y,1\n").encode(), "MALFORMED_CSV", {"line": "2"}),
        (b"sku,merchant_id,category,colour,brand,model,list_price_fen\n", "UNKNOWN_COLUMN", {}),
        (b"sku,merchant_id,category,brand,model\na,b,tv,x,y\n", "MISSING_COLUMN", {}),
        (b"sku,sku,merchant_id,category,brand,model,list_price_fen\n", "DUPLICATE_COLUMN", {}),
        (
            b"sku,merchant_id,category,brand,model,list_price_fen,list_price_yuan\na,b,c,d,e,1,1\n",
            "MISSING_COLUMN",
            {},
        ),
        (HEADER.encode() + b"a,b,tv,1,x,y,1\n" * 60_000, "TOO_MANY_ROWS", {}),
        (HEADER.encode() + b"a,b,tv,1,x,y,1\n" * 220_000, "CSV_TOO_LARGE", {}),
    ],
    ids=[
        "empty",
        "header-only",
        "utf16",
        "bad-byte",
        "unclosed-quote",
        "nul",
        "unknown-column",
        "no-price",
        "duplicate-column",
        "two-prices",
        "too-many-rows",
        "too-large",
    ],
)
async def test_malformed_files_are_refused_whole(
    platform: Platform, data: bytes, reason: str, extra: dict[str, str]
) -> None:
    p = platform
    before = await catalog_events(p)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await run_import(p, data)
    assert status_of(err.value) == (INVALID, reason, "csv"), err.value.details()
    from services.kernel.rpc import error_info

    info = error_info(err.value)
    assert info is not None
    for key, value in extra.items():
        assert info.metadata[key] == value
    assert await catalog_events(p) == before


async def test_import_needs_an_operator_and_a_reason(platform: Platform) -> None:
    p = platform
    data = (HEADER + "a,b,tv,1,x,y,1\n").encode()

    async def attempt(**kw: Any) -> None:
        fields: dict[str, Any] = dict(csv=data, actor=OPERATOR, reason="r")
        async for _ in p.catalog.ImportProducts(
            catalog_pb2.ImportProductsRequest(**{**fields, **kw})
        ):
            pass

    before = await catalog_events(p)
    cases: list[tuple[dict[str, Any], tuple[grpc.StatusCode, str, str]]] = [
        (dict(reason=""), (INVALID, "MISSING_FIELD", "reason")),
        # Who imports is the certificate's: a platform's is refused before anything is read.
        (
            dict(actor=common_pb2.Actor(kind=common_pb2.Actor.KIND_PLATFORM, id="jd")),
            (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED", ""),
        ),
    ]
    for kw, expected in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await attempt(**kw)
        assert status_of(err.value) == expected
    assert await catalog_events(p) == before


# --------------------------------------------------------------------------------------------
# The operator's command line, as a separate process against the running catalog


OP_LI = Caller(Role.OPERATOR, "op-li")


async def cli(p: Platform, *args: str, who: Caller = OP_LI) -> tuple[int, dict[str, Any], str]:
    """The CLI as ``who`` (a certificate issued for the call, as ``--identity`` reads it)."""
    with tempfile.TemporaryDirectory() as tmp:
        identity = identity_dir(p.infra.identities(who), Path(tmp))
        return await subsidyctl(
            *args, "--catalog", f"127.0.0.1:{p.running['catalog'].port}", identity=identity
        )


async def test_cli_quote_prints_one_json_object(platform: Platform) -> None:
    code, answer, _ = await cli(
        platform, "quote", "--category", "refrigerator", "--grade", "1", "--price-fen", "1200000"
    )
    assert code == 0
    assert answer == {
        "eligible": True,
        "subsidy_fen": 200_000,
        "rate_bp": 2000,
        "cap_fen": 200_000,
        "policy_version": DEMO_POLICY_VERSION,
        "reasons": [],
    }
    code, answer, _ = await cli(
        platform,
        "quote",
        "--category",
        "phone",
        "--price-fen",
        "600100",
        "--policy",
        DEMO_POLICY_VERSION,
    )
    assert (code, answer["eligible"], answer["reasons"]) == (0, False, ["PRICE_ABOVE_CEILING"])
    code, answer, err = await cli(platform, "quote", "--category", "phone", "--price-fen", "-5")
    assert (code, answer) == (2, {})
    assert '"reason": "INVALID_PRICE"' in err and '"field": "price_fen"' in err


async def test_cli_import_reports_lines_and_exit_codes(
    platform: Platform, rng: random.Random, tmp_path: Any
) -> None:
    p = platform
    m = await merchant(p, rng)
    s = f"cli{rng.randrange(10**9)}"
    bad = tmp_path / "bad.csv"
    bad.write_text(bad_file(m, s), encoding="utf-8")
    before = await catalog_events(p)
    code, answer, err = await cli(p, "import", str(bad))
    assert (code, answer["outcome"], answer["applied"]) == (1, "APPLIED_NOTHING", 0)
    assert [r["line"] for r in answer["rejected"]] == [x[0] for x in EXPECTED_ERRORS]
    assert "line 3: UNKNOWN_CATEGORY" in err and "nothing imported" in err
    assert "validate: 11/11 rows (100%)" in err  # the progress, plainly, when not a terminal
    assert await catalog_events(p) == before

    code, answer, err = await cli(p, "import", str(bad), "--only-good-rows")
    assert (code, answer["outcome"], answer["applied"]) == (0, "APPLIED_GOOD_ROWS", 2)
    assert "9 bad row(s) NOT imported" in err
    assert "apply: 2/2 rows (100%)" in err
    assert await catalog_events(p) == before + 3
    code, _, err = await cli(p, "import", str(tmp_path / "missing.csv"))
    assert code == 2 and "cannot read" in err
