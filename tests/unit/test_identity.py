"""Consumer identity rules: ID number, phone and name validation, masking, and the fixtures.

The only literal ID numbers here are the two public GB 11643-1999 examples; every other number
is generated at run time (tests/support/identities.py).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.kernel.contract.personal_data import (
    ID_NUMBER_BIRTH_DATE,
    ID_NUMBER_CHECKSUM,
    ID_NUMBER_FORMAT,
    ID_NUMBER_LENGTH,
    MIN_BIRTH_YEAR,
    NAME_FORMAT,
    NAME_LENGTH,
    PHONE_FORMAT,
    PHONE_LENGTH,
    InvalidIdentity,
    InvalidIdNumber,
    InvalidName,
    InvalidPhone,
    birth_date,
    id_number_check_char,
    is_male,
    mask_id_number,
    mask_name,
    mask_phone,
    validate_id_number,
    validate_name,
    validate_phone,
)
from tests.support.identities import (
    PINGSHAN,
    Person,
    id_numbers,
    make_id_number,
    make_name,
    make_person,
    make_phone,
    persons,
    with_check_char,
)

# The two public examples (GB 11643-1999 and its common citation); the only ones allowed here.
BEIJING_EXAMPLE = "11010519491231002X"
STANDARD_EXAMPLE = "440524188001010014"

TODAY = dt.date(2025, 6, 1)
ALL_REASONS = {
    ID_NUMBER_LENGTH,
    ID_NUMBER_FORMAT,
    ID_NUMBER_BIRTH_DATE,
    ID_NUMBER_CHECKSUM,
    PHONE_LENGTH,
    PHONE_FORMAT,
    NAME_LENGTH,
    NAME_FORMAT,
}


def _rejection(validate: Callable[[str], str], value: str) -> InvalidIdentity:
    with pytest.raises(InvalidIdentity) as caught:
        validate(value)
    return caught.value


def _assert_no_leak(exc: InvalidIdentity, value: str) -> None:
    """The exception carries only its reason: not the value, not a chained exception."""
    # The message is one of a small fixed set of strings, which by itself rules out a leak;
    # the substring checks below make the intent explicit for realistic inputs.
    assert exc.reason in ALL_REASONS
    assert str(exc) == f"invalid {exc.kind}: {exc.reason}"
    assert exc.args == (str(exc),)
    digits = re.sub(r"[^0-9]", "", value)
    for text in (str(exc), repr(exc)):
        if len(value.strip()) >= 8:
            assert value.strip() not in text
        if len(digits) >= 4:
            assert digits not in text
    assert exc.__cause__ is None
    assert exc.__context__ is None


# --------------------------------------------------------------------------------------------
# Resident ID numbers


def test_public_examples_are_valid() -> None:
    assert validate_id_number(BEIJING_EXAMPLE) == BEIJING_EXAMPLE
    assert validate_id_number(STANDARD_EXAMPLE) == STANDARD_EXAMPLE


def test_normalisation_strips_and_upper_cases() -> None:
    assert validate_id_number(f"  {BEIJING_EXAMPLE.lower()}\n") == BEIJING_EXAMPLE


def test_birth_date_and_sex_of_the_public_examples() -> None:
    assert birth_date(BEIJING_EXAMPLE) == dt.date(1949, 12, 31)
    assert not is_male(BEIJING_EXAMPLE)  # sequence 002: even
    assert birth_date(STANDARD_EXAMPLE) == dt.date(1880, 1, 1)
    assert is_male(STANDARD_EXAMPLE)  # sequence 001: odd


def test_check_char_of_the_public_examples() -> None:
    assert id_number_check_char(BEIJING_EXAMPLE[:17]) == "X"
    assert id_number_check_char(STANDARD_EXAMPLE[:17]) == "4"


@pytest.mark.parametrize(
    "first17", ["", "1234", "1101051949123100X", "１１０１０５１９４９１２３１００２"]
)
def test_check_char_rejects_anything_but_17_ascii_digits(first17: str) -> None:
    with pytest.raises(InvalidIdNumber) as caught:
        id_number_check_char(first17)
    assert caught.value.reason == ID_NUMBER_FORMAT


def _length_cases() -> list[str]:
    return [
        "",
        "   ",
        BEIJING_EXAMPLE[:17],
        BEIJING_EXAMPLE + "0",
        STANDARD_EXAMPLE[:6] + STANDARD_EXAMPLE[8:17],  # the old 15-digit form
        BEIJING_EXAMPLE[:9] + " " + BEIJING_EXAMPLE[9:],
    ]


def _format_cases() -> list[str]:
    body = BEIJING_EXAMPLE[:17]
    return [
        with_check_char("0" + body[1:]),  # address codes start with 1..9
        body[:10] + "A" + body[11:] + "0",
        body[:16] + "X" + "X",  # X only as the check character
        STANDARD_EXAMPLE[:17] + "Y",
        "１" * 18,  # full-width digits are digits to str.isdigit, not to the standard
        "-" + STANDARD_EXAMPLE[1:],
    ]


def _birth_date_cases() -> list[str]:
    def with_birth(birth: str) -> str:
        return with_check_char(PINGSHAN + birth + "123")

    return [
        with_birth("19991301"),  # month 13
        with_birth("19990001"),  # month 0
        with_birth("19990132"),  # day 32
        with_birth("19990100"),  # day 0
        with_birth("19990230"),
        with_birth("19000229"),  # 1900 was not a leap year
        with_birth("20230229"),
        with_birth("00000101"),
        with_birth(f"{MIN_BIRTH_YEAR - 1}1231"),
        with_birth("99991231"),
        with_birth((TODAY + dt.timedelta(days=1)).strftime("%Y%m%d")),  # not born yet
    ]


def _checksum_cases() -> list[str]:
    return [
        BEIJING_EXAMPLE[:17] + "0",
        STANDARD_EXAMPLE[:17] + "X",
        STANDARD_EXAMPLE[:17] + "5",
        # Two adjacent digits swapped: the weights differ, so the check catches it.
        STANDARD_EXAMPLE[:15] + STANDARD_EXAMPLE[16] + STANDARD_EXAMPLE[15] + STANDARD_EXAMPLE[17:],
    ]


ID_REJECTIONS = [
    *[(value, ID_NUMBER_LENGTH) for value in _length_cases()],
    *[(value, ID_NUMBER_FORMAT) for value in _format_cases()],
    *[(value, ID_NUMBER_BIRTH_DATE) for value in _birth_date_cases()],
    *[(value, ID_NUMBER_CHECKSUM) for value in _checksum_cases()],
]


@pytest.mark.parametrize(("value", "reason"), ID_REJECTIONS, ids=[r for _, r in ID_REJECTIONS])
def test_id_number_rejections(value: str, reason: str) -> None:
    exc = _rejection(lambda v: validate_id_number(v, today=TODAY), value)
    assert isinstance(exc, InvalidIdNumber)
    assert exc.reason == reason
    _assert_no_leak(exc, value)


@pytest.mark.parametrize("value", [None, 11010519491231002, b"11010519491231002X"])
def test_id_number_of_the_wrong_type(value: object) -> None:
    with pytest.raises(InvalidIdNumber) as caught:
        validate_id_number(value)  # type: ignore[arg-type]
    assert caught.value.reason == ID_NUMBER_FORMAT


def test_birth_today_is_valid_tomorrow_is_not() -> None:
    rng = random.Random(1)
    born_today = make_id_number(rng, birth=TODAY)
    assert validate_id_number(born_today, today=TODAY) == born_today
    born_tomorrow = make_id_number(rng, birth=TODAY + dt.timedelta(days=1))
    with pytest.raises(InvalidIdNumber) as caught:
        validate_id_number(born_tomorrow, today=TODAY)
    assert caught.value.reason == ID_NUMBER_BIRTH_DATE


def test_today_defaults_to_the_current_date() -> None:
    rng = random.Random(2)
    with pytest.raises(InvalidIdNumber, match=ID_NUMBER_BIRTH_DATE):
        validate_id_number(make_id_number(rng, birth=dt.date(9000, 1, 1)))
    assert validate_id_number(make_id_number(rng, birth=dt.date(2000, 2, 29)))


def test_helpers_validate_first() -> None:
    bad = STANDARD_EXAMPLE[:17] + "X"
    with pytest.raises(InvalidIdNumber, match=ID_NUMBER_CHECKSUM):
        birth_date(bad)
    with pytest.raises(InvalidIdNumber, match=ID_NUMBER_CHECKSUM):
        is_male(bad)


@given(id_numbers())
def test_generated_id_numbers_validate(number: str) -> None:
    assert validate_id_number(number) == number
    assert validate_id_number(number.lower()) == number


@given(
    rng=st.randoms(use_true_random=False),
    birth=st.dates(min_value=dt.date(MIN_BIRTH_YEAR, 1, 1), max_value=TODAY),
    male=st.booleans(),
)
def test_birth_date_and_sex_round_trip(rng: random.Random, birth: dt.date, male: bool) -> None:
    number = make_id_number(rng, birth=birth, male=male)
    assert validate_id_number(number, today=TODAY) == number
    assert birth_date(number) == birth
    assert is_male(number) is male


def _expected_reason_after_edit(number: str, position: int) -> str:
    """Which rule a one-character edit breaks first, given that the check always breaks."""
    if number[0] == "0":
        return ID_NUMBER_FORMAT
    digits = number[6:14]
    try:
        born = dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return ID_NUMBER_BIRTH_DATE
    if born.year < MIN_BIRTH_YEAR or born > TODAY:
        return ID_NUMBER_BIRTH_DATE
    return ID_NUMBER_CHECKSUM


@given(number=id_numbers(), position=st.integers(min_value=0, max_value=17), data=st.data())
def test_any_single_character_change_is_rejected(
    number: str, position: int, data: st.DataObject
) -> None:
    # Every weight is non-zero mod 11 and a digit moves by at most 9 < 11, so the weighted sum
    # always changes: no single substitution can keep the check character right.
    alphabet = "0123456789X" if position == 17 else "0123456789"
    replacement = data.draw(st.sampled_from([c for c in alphabet if c != number[position]]))
    edited = number[:position] + replacement + number[position + 1 :]
    with pytest.raises(InvalidIdNumber) as caught:
        validate_id_number(edited, today=TODAY)
    assert caught.value.reason == _expected_reason_after_edit(edited, position)
    _assert_no_leak(caught.value, edited)


@given(st.text(max_size=40))
def test_id_number_messages_never_carry_the_input(value: str) -> None:
    try:
        validate_id_number(value, today=TODAY)
    except InvalidIdNumber as exc:
        _assert_no_leak(exc, value)


# --------------------------------------------------------------------------------------------
# Mobile numbers


@pytest.mark.parametrize(
    "value",
    [
        "13812345678",
        " 13812345678 ",
        "138 1234 5678",
        "138-1234-5678",
        "+8613812345678",
        "+86 138 1234 5678",
        "+86-138-1234-5678",
        "8613812345678",
        "86 138 1234 5678",
        "138\t1234\u30005678",  # a tab and an ideographic space, as pasted from forms
    ],
)
def test_valid_phone_forms(value: str) -> None:
    assert validate_phone(value) == "13812345678"


@pytest.mark.parametrize("second", "3456789")
def test_every_mobile_prefix_is_accepted(second: str) -> None:
    assert validate_phone(f"1{second}012345678") == f"1{second}012345678"


PHONE_REJECTIONS = [
    ("", PHONE_LENGTH),
    ("   ", PHONE_LENGTH),
    ("+86", PHONE_LENGTH),
    ("1381234567", PHONE_LENGTH),
    ("138123456789", PHONE_LENGTH),
    ("008613812345678", PHONE_LENGTH),  # 0086 is not an accepted prefix
    ("861381234567", PHONE_LENGTH),
    ("12812345678", PHONE_FORMAT),  # 12x is not a mobile range
    ("10812345678", PHONE_FORMAT),
    ("23812345678", PHONE_FORMAT),
    ("1381234567a", PHONE_FORMAT),
    ("138.1234.5678", PHONE_FORMAT),
    ("(138)12345678", PHONE_FORMAT),
    ("+1 13812345678", PHONE_FORMAT),
    ("13812+345678", PHONE_FORMAT),
    ("１３８１２３４５６７８", PHONE_FORMAT),  # full-width digits
]


@pytest.mark.parametrize(("value", "reason"), PHONE_REJECTIONS)
def test_phone_rejections(value: str, reason: str) -> None:
    exc = _rejection(validate_phone, value)
    assert isinstance(exc, InvalidPhone)
    assert exc.reason == reason
    _assert_no_leak(exc, value)


def test_phone_of_the_wrong_type() -> None:
    with pytest.raises(InvalidPhone) as caught:
        validate_phone(13812345678)  # type: ignore[arg-type]
    assert caught.value.reason == PHONE_FORMAT


@given(rng=st.randoms(use_true_random=False), style=st.integers(min_value=0, max_value=3))
def test_generated_phones_validate_in_any_written_form(rng: random.Random, style: int) -> None:
    phone = make_phone(rng)
    written = [
        phone,
        f"+86 {phone[:3]} {phone[3:7]} {phone[7:]}",
        f"86{phone}",
        f"{phone[:3]}-{phone[3:7]}-{phone[7:]}",
    ][style]
    assert validate_phone(written) == phone


@given(st.text(max_size=30))
def test_phone_messages_never_carry_the_input(value: str) -> None:
    try:
        validate_phone(value)
    except InvalidPhone as exc:
        _assert_no_leak(exc, value)


# --------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("张三", "张三"),
        ("  张三\n", "张三"),
        ("欧阳娜娜", "欧阳娜娜"),
        ("阿卜杜拉·买买提", "阿卜杜拉·买买提"),
        ("Zhang San", "Zhang San"),
        ("李", "李"),
        ("龍" * 64, "龍" * 64),
        ("\uf900", "\uf900"),  # a CJK compatibility ideograph stays as written (no NFC)
        ("\U00031350", "\U00031350"),  # CJK extension H: newer than some Unicode tables
    ],
)
def test_valid_names(value: str, expected: str) -> None:
    assert validate_name(value) == expected


NAME_REJECTIONS = [
    ("", NAME_LENGTH),
    ("   ", NAME_LENGTH),
    ("\u3000", NAME_LENGTH),
    ("龍" * 65, NAME_LENGTH),
    ("张\x00三", NAME_FORMAT),
    ("张\n三", NAME_FORMAT),
    ("张\x7f三", NAME_FORMAT),
    ("张\u200b三", NAME_FORMAT),  # zero-width space
    ("张\u202e三", NAME_FORMAT),  # right-to-left override
    ("张\u2028三", NAME_FORMAT),  # line separator
    ("张\ue000三", NAME_FORMAT),  # private use
]


@pytest.mark.parametrize(("value", "reason"), NAME_REJECTIONS)
def test_name_rejections(value: str, reason: str) -> None:
    exc = _rejection(validate_name, value)
    assert isinstance(exc, InvalidName)
    assert exc.reason == reason
    _assert_no_leak(exc, value)


def test_name_of_the_wrong_type() -> None:
    with pytest.raises(InvalidName) as caught:
        validate_name(None)  # type: ignore[arg-type]
    assert caught.value.reason == NAME_FORMAT


@given(rng=st.randoms(use_true_random=False))
def test_generated_names_validate(rng: random.Random) -> None:
    name = make_name(rng)
    assert validate_name(name) == name
    assert 2 <= len(name) <= 3


@given(st.text(max_size=80))
def test_name_messages_never_carry_the_input(value: str) -> None:
    try:
        validate_name(value)
    except InvalidName as exc:
        assert str(exc) == f"invalid name: {exc.reason}"
        assert exc.__context__ is None


# --------------------------------------------------------------------------------------------
# Masking


def test_masking_examples() -> None:
    assert mask_id_number(STANDARD_EXAMPLE) == "4405**********0014"
    assert mask_id_number(BEIJING_EXAMPLE) == "1101**********002X"
    assert mask_phone("13812345678") == "138****5678"
    assert mask_name("张三") == "张*"
    assert mask_name("欧阳娜娜") == "欧***"


@pytest.mark.parametrize(
    ("masker", "value", "expected"),
    [
        (mask_id_number, "", ""),
        (mask_id_number, STANDARD_EXAMPLE[:17], "*" * 17),
        (mask_id_number, f" {STANDARD_EXAMPLE} ", "4405**********0014"),
        (mask_phone, "", ""),
        (mask_phone, "1381234567", "*" * 10),
        (mask_phone, "+8613812345678", "*" * 14),
        (mask_name, "", ""),
        (mask_name, "李", "*"),  # a one-character name would otherwise be shown whole
        (mask_name, " 李 ", "*"),
    ],
)
def test_masking_never_shows_more_than_its_fixed_parts(
    masker: Callable[[str], str], value: str, expected: str
) -> None:
    assert masker(value) == expected


@given(id_numbers())
def test_masked_id_numbers_hide_birth_date_and_sequence(number: str) -> None:
    masked = mask_id_number(number)
    assert len(masked) == 18
    assert masked[:4] == number[:4]
    assert masked[-4:] == number[-4:]
    assert masked[4:14] == "*" * 10


@given(persons)
def test_masked_person_fields(person: Person) -> None:
    assert mask_phone(person.phone) == f"{person.phone[:3]}****{person.phone[7:]}"
    masked_name = mask_name(person.name)
    assert masked_name[0] == person.name[0]
    assert set(masked_name[1:]) == {"*"}


# --------------------------------------------------------------------------------------------
# Test support: the fixtures themselves


def test_make_person_is_valid_and_reproducible() -> None:
    first = make_person(random.Random(42))
    assert first == make_person(random.Random(42))
    assert validate_name(first.name) == first.name
    assert validate_id_number(first.id_number) == first.id_number
    assert first.id_number.startswith(PINGSHAN)
    assert validate_phone(first.phone) == first.phone


def test_make_id_number_honours_its_arguments() -> None:
    rng = random.Random(7)
    number = make_id_number(rng, address="110105", birth=dt.date(1990, 5, 17), male=False)
    assert number.startswith("11010519900517")
    assert not is_male(number)
    assert is_male(make_id_number(rng, male=True))


@pytest.mark.parametrize("address", ["", "44031", "4403100", "040310", "44031A"])
def test_make_id_number_rejects_bad_address_codes(address: str) -> None:
    with pytest.raises(ValueError, match="address"):
        make_id_number(random.Random(0), address=address)


_ID_LIKE = re.compile(r"(?<![0-9A-Za-z])[1-9][0-9]{16}[0-9Xx](?![0-9A-Za-z])")
_REPO = Path(__file__).resolve().parents[2]
_SKIP_DIRS = {".git", ".venv", "node_modules", "build", "dist", "__pycache__", ".hypothesis"}
_SCANNED_SUFFIXES = {".py", ".pyi", ".yaml", ".yml", ".json", ".md", ".txt", ".proto", ".sql"}


def _source_files() -> list[Path]:
    files: list[Path] = []
    for directory, subdirs, names in os.walk(_REPO):
        # Prune in place so os.walk never descends into the virtualenv or caches.
        subdirs[:] = [d for d in subdirs if d not in _SKIP_DIRS and not d.startswith(".")]
        files.extend(Path(directory, n) for n in names if Path(n).suffix in _SCANNED_SUFFIXES)
    return files


def test_no_real_looking_id_number_is_committed() -> None:
    """Only the two public examples may appear literally anywhere in the source tree."""
    found: list[str] = []
    for path in _source_files():
        for candidate in _ID_LIKE.findall(path.read_text(encoding="utf-8", errors="replace")):
            if candidate.upper() in {BEIJING_EXAMPLE, STANDARD_EXAMPLE}:
                continue
            try:
                validate_id_number(candidate)
            except InvalidIdNumber:
                continue  # not a valid number, so not anybody's
            found.append(f"{path.relative_to(_REPO)}: {mask_id_number(candidate)}")
    assert found == []
