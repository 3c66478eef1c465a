"""Hypothesis strategies for any protobuf request, built from its message descriptor.

Nothing here names an RPC or a field: a request message is walked field by field, so a new
RPC or a new field is fuzzed without editing this module. Each scalar field draws from the
values that break edge code (boundaries, empties, long and unicode strings, control
characters, NUL, negative and huge numbers, NaN, enum numbers no enum defines) and, for
strings, from ``known`` values (the seeded campaign's real ids and categories) so that some
requests get past the "not found" checks into the rules behind them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

# Integer boundaries of each protobuf scalar type.
_INT_RANGES: dict[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
# Lengths that sit on the limits the edge is likely to enforce (64, 128, 256, ... characters),
# one either side, and one far beyond any of them.
_LENGTHS = (1, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1023, 1024, 1025, 4097, 70_000)
_CONTROL = "".join(chr(c) for c in range(32)) + "\x7f\u200b\u202e\ufeff\u2028"
_ODD_TEXT = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "../../etc/passwd",
    "'; DROP TABLE events; --",
    "%s%s%n",
    "{{7*7}}",
    "a/b",
    "/",
    "*",
    ">",
    "events.>",
    "-1",
    "0",
    "1e309",
    "NaN",
    "9" * 40,
    "null",
    "true",
    "\U0001f600" * 3,
    "冰箱",
    "ʀᴇꜰʀɪɢᴇʀᴀᴛᴏʀ",
    "refrigerator ",
    "REFRIGERATOR",
    "2026-02-30T25:61:61Z",
    "11010519491231002X",
    "440524188001010014",
    "110105194912310021",  # a wrong check character
    "13800000000",
    "+8613800000000",
    "12345",
)


def _text(known: Sequence[str]) -> st.SearchStrategy[str]:
    long = st.sampled_from(_LENGTHS).flatmap(
        lambda n: st.sampled_from(("a", "9", "冰", "\U0001f600", "/")).map(lambda c: c * n)
    )
    options: list[st.SearchStrategy[str]] = [
        st.sampled_from(_ODD_TEXT),
        st.text(max_size=40),
        st.text(alphabet=st.sampled_from(_CONTROL), min_size=1, max_size=8),
        long,
        st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True),
    ]
    if known:
        ids = st.sampled_from(tuple(known))
        options += [ids, ids, ids.map(lambda s: s + "\x00"), ids.map(str.upper)]
    return st.one_of(options)


def _integer(field_type: int) -> st.SearchStrategy[int]:
    low, high = _INT_RANGES[field_type]
    edges = (low, low + 1, -1, 0, 1, 2, 99, 100, 10_000, 600_000, 2**53 + 1, high - 1, high)
    return st.one_of(
        st.sampled_from(sorted({v for v in edges if low <= v <= high})),
        st.integers(max(low, -1000), 1_000_000),  # plausible amounts and counts
        st.integers(low, high),
    )


def _scalar(field: FieldDescriptor, known: Sequence[str]) -> st.SearchStrategy[object]:
    t = field.type
    if t in _INT_RANGES:
        return _integer(t)
    if t == FieldDescriptor.TYPE_STRING:
        return _text(known)
    if t == FieldDescriptor.TYPE_BYTES:
        return st.one_of(
            st.binary(max_size=64),
            st.sampled_from(_LENGTHS).map(lambda n: b"\xff" * n),
            st.sampled_from((b"", b"\x00" * 32, b"\x0a\x7fab")),
        )
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        if t == FieldDescriptor.TYPE_FLOAT:
            return st.floats(width=32)  # NaN, infinities and subnormals included
        return st.floats()
    if t == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        defined = [v.number for v in field.enum_type.values]
        # Proto3 enums are open: any int32 decodes, so numbers no enum defines arrive too.
        return st.one_of(st.sampled_from(defined), st.integers(-(2**31), 2**31 - 1))
    raise AssertionError(f"unhandled field type {t} of {field.full_name}")


def _message_type(field: FieldDescriptor) -> Descriptor:
    assert field.message_type is not None, field.full_name
    return field.message_type


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and bool(
        _message_type(field).GetOptions().map_entry
    )


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def message(
    descriptor: Descriptor, known: Sequence[str] = (), depth: int = 3
) -> st.SearchStrategy[Message]:
    """Any value of ``descriptor``'s message: each field present or not, with an awkward
    value; nested messages down to ``depth``, repeated fields from empty to a few hundred."""
    cls = GetMessageClass(descriptor)
    parts: dict[str, st.SearchStrategy[object]] = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE and not _is_map(field):
            if depth <= 0:
                continue
            single: st.SearchStrategy[object] = message(_message_type(field), known, depth - 1)
        elif _is_map(field):
            key_field = _message_type(field).fields_by_name["key"]
            value_field = _message_type(field).fields_by_name["value"]
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                if depth <= 0:
                    continue
                values: st.SearchStrategy[object] = message(
                    _message_type(value_field), known, depth - 1
                )
            else:
                values = _scalar(value_field, known)
            parts[field.name] = st.dictionaries(_scalar(key_field, known), values, max_size=5)
            continue
        else:
            single = _scalar(field, known)
        if _is_repeated(field):
            parts[field.name] = st.one_of(
                st.lists(single, max_size=4),
                # Many copies of one value: a list far longer than any real request's.
                st.tuples(single, st.sampled_from((50, 300))).map(lambda p: [p[0]] * p[1]),
            )
        else:
            parts[field.name] = single
    optional = {name: st.one_of(st.none(), s) for name, s in parts.items()}
    return st.fixed_dictionaries(optional).map(lambda values: _build(cls, values))


def _build(cls: type[Message], values: dict[str, object]) -> Message:
    m = cls()
    for name, value in values.items():
        if value is None:
            continue
        field: FieldDescriptor = m.DESCRIPTOR.fields_by_name[name]  # type: ignore[assignment]
        target = getattr(m, name) if _is_repeated(field) else None
        if _is_map(field):
            assert isinstance(value, dict) and target is not None
            for k, v in value.items():
                if isinstance(v, Message):
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif _is_repeated(field):
            assert isinstance(value, list) and target is not None
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                for item in value:
                    target.add().CopyFrom(item)
            else:
                target.extend(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            assert isinstance(value, Message)
            getattr(m, name).CopyFrom(value)
        else:
            setattr(m, name, value)
    return m


def mutate(data: bytes, rng: random.Random) -> bytes:
    """``data`` (a valid request's bytes) damaged as a wire or a hostile client damages it:
    bits flipped, cut short, bytes inserted, a slice repeated, or a length made huge."""
    b = bytearray(data or b"\x00")
    for _ in range(rng.randint(1, 4)):
        how = rng.randrange(6)
        i = rng.randrange(len(b)) if b else 0
        if how == 0 and b:
            b[i] ^= 1 << rng.randrange(8)
        elif how == 1 and len(b) > 1:
            del b[rng.randrange(1, len(b)) :]
        elif how == 2:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif how == 3 and b:
            j = rng.randrange(i, len(b)) + 1
            b[i:i] = b[i:j] * rng.randint(1, 20)
        elif how == 4 and b:
            b[i] = rng.choice((0x00, 0x7F, 0x80, 0xFF))
        else:
            # A length-delimited field claiming far more bytes than follow.
            b[i:i] = bytes((rng.randrange(1, 16) << 3 | 2, 0xFF, 0xFF, 0xFF, 0x7F))
    return bytes(b)
