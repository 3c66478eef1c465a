"""Consumer identity rules: format checks and masking for name, resident ID number and phone.

These only check that a value is well-formed; whether the three factors belong together is the
identity authority's call (through its adapter). ID and phone numbers are sensitive personal
information (PIPL), so no exception raised here ever carries the input: only a fixed,
machine-readable reason code. Pure functions; no I/O.
"""

from __future__ import annotations

import calendar
import datetime as dt
import re
import unicodedata
from typing import ClassVar, Final

# Reason codes: stable, machine-readable, safe to log.
ID_NUMBER_LENGTH: Final = "ID_NUMBER_LENGTH"
ID_NUMBER_FORMAT: Final = "ID_NUMBER_FORMAT"
ID_NUMBER_BIRTH_DATE: Final = "ID_NUMBER_BIRTH_DATE"
ID_NUMBER_CHECKSUM: Final = "ID_NUMBER_CHECKSUM"
PHONE_LENGTH: Final = "PHONE_LENGTH"
PHONE_FORMAT: Final = "PHONE_FORMAT"
NAME_LENGTH: Final = "NAME_LENGTH"
NAME_FORMAT: Final = "NAME_FORMAT"

ID_NUMBER_WEIGHTS: Final = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
ID_NUMBER_CHECK_CHARS: Final = "10X98765432"  # indexed by weighted sum mod 11
# GB 11643-1999's own worked example (440524188001010014) is dated 1880, so 1900 would be too
# strict a floor; anything before 1800 is certainly a typing error.
MIN_BIRTH_YEAR: Final = 1800
NAME_MAX_LENGTH: Final = 64

# China Standard Time has had no DST since 1991, so a fixed offset needs no tz database.
_CHINA_TZ: Final = dt.timezone(dt.timedelta(hours=8))
_ID_RE: Final = re.compile(r"[1-9][0-9]{16}[0-9X]")
_PHONE_RE: Final = re.compile(r"1[3-9][0-9]{9}")
_ASCII_DIGITS_RE: Final = re.compile(r"[0-9]*")
_PHONE_SEPARATORS_RE: Final = re.compile(r"[\s\-]")
# Control, format (zero-width etc.), surrogate, private-use, and line/paragraph separators.
# Unassigned code points (Cn) are allowed: names use rare CJK characters newer than Python's
# Unicode tables.
_FORBIDDEN_NAME_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})


class InvalidIdentity(ValueError):
    """Base for identity validation failures. ``reason`` is a machine-readable code; the
    message is built from the reason alone, never from the rejected value."""

    kind: ClassVar[str] = "identity"

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid {self.kind}: {reason}")
        self.reason = reason


class InvalidIdNumber(InvalidIdentity):
    """A resident ID number is malformed."""

    kind = "resident ID number"


class InvalidPhone(InvalidIdentity):
    """A mobile number is malformed."""

    kind = "mobile number"


class InvalidName(InvalidIdentity):
    """A name is empty, too long or contains control characters."""

    kind = "name"


def id_number_check_char(first17: str) -> str:
    """The GB 11643-1999 check character for the first 17 digits of an ID number."""
    if len(first17) != 17 or not _ASCII_DIGITS_RE.fullmatch(first17):
        raise InvalidIdNumber(ID_NUMBER_FORMAT)
    total = sum(
        int(digit) * weight for digit, weight in zip(first17, ID_NUMBER_WEIGHTS, strict=True)
    )
    return ID_NUMBER_CHECK_CHARS[total % 11]


def _parse_birth_date(digits: str) -> dt.date | None:
    year, month, day = int(digits[0:4]), int(digits[4:6]), int(digits[6:8])
    # Checked up front rather than by catching date()'s ValueError, so that no exception ends
    # up as the __context__ of ours.
    if year < MIN_BIRTH_YEAR or not 1 <= month <= 12:
        return None
    if not 1 <= day <= calendar.monthrange(year, month)[1]:
        return None
    return dt.date(year, month, day)


def validate_id_number(value: str, *, today: dt.date | None = None) -> str:
    """Validate an 18-character resident ID number (GB 11643-1999) and return it normalised
    (surrounding whitespace removed, check character upper-case).

    The birth date must be a real date from ``MIN_BIRTH_YEAR`` up to ``today`` (default: the
    current date in China). Raises :class:`InvalidIdNumber` with reason ``ID_NUMBER_LENGTH``,
    ``ID_NUMBER_FORMAT``, ``ID_NUMBER_BIRTH_DATE`` or ``ID_NUMBER_CHECKSUM``.
    """
    if not isinstance(value, str):
        raise InvalidIdNumber(ID_NUMBER_FORMAT)
    number = value.strip().upper()
    if len(number) != 18:
        raise InvalidIdNumber(ID_NUMBER_LENGTH)
    if not _ID_RE.fullmatch(number):
        raise InvalidIdNumber(ID_NUMBER_FORMAT)
    born = _parse_birth_date(number[6:14])
    latest = today if today is not None else dt.datetime.now(_CHINA_TZ).date()
    if born is None or born > latest:
        raise InvalidIdNumber(ID_NUMBER_BIRTH_DATE)
    if id_number_check_char(number[:17]) != number[17]:
        raise InvalidIdNumber(ID_NUMBER_CHECKSUM)
    return number


def birth_date(id_number: str) -> dt.date:
    """The date of birth encoded in a resident ID number (validated first)."""
    number = validate_id_number(id_number)
    born = _parse_birth_date(number[6:14])
    assert born is not None  # validate_id_number has checked it
    return born


def is_male(id_number: str) -> bool:
    """Whether a resident ID number was issued to a man: its 17th digit is odd."""
    return int(validate_id_number(id_number)[16]) % 2 == 1


def validate_phone(value: str) -> str:
    """Validate a mainland mobile number and return its 11 digits.

    Spaces and hyphens are ignored and a leading ``+86`` or ``86`` country code is dropped.
    Raises :class:`InvalidPhone` with reason ``PHONE_LENGTH`` or ``PHONE_FORMAT``.
    """
    if not isinstance(value, str):
        raise InvalidPhone(PHONE_FORMAT)
    number = _PHONE_SEPARATORS_RE.sub("", value)
    if number.startswith("+86"):
        number = number[3:]
    elif number.startswith("86") and len(number) == 13:
        # Only with exactly 13 digits: an 11-digit number never starts with 86 anyway.
        number = number[2:]
    if not _ASCII_DIGITS_RE.fullmatch(number):
        raise InvalidPhone(PHONE_FORMAT)
    if len(number) != 11:
        raise InvalidPhone(PHONE_LENGTH)
    if not _PHONE_RE.fullmatch(number):
        raise InvalidPhone(PHONE_FORMAT)
    return number


def validate_name(value: str) -> str:
    """Validate a person's name and return it with surrounding whitespace removed.

    1..64 characters, no control or invisible formatting characters. The name is otherwise
    kept exactly as given (no Unicode normalisation: NFC would rewrite CJK compatibility
    ideographs, and the identity authority compares names character by character).
    Raises :class:`InvalidName` with reason ``NAME_LENGTH`` or ``NAME_FORMAT``.
    """
    if not isinstance(value, str):
        raise InvalidName(NAME_FORMAT)
    name = value.strip()
    if not 1 <= len(name) <= NAME_MAX_LENGTH:
        raise InvalidName(NAME_LENGTH)
    if any(unicodedata.category(char) in _FORBIDDEN_NAME_CATEGORIES for char in name):
        raise InvalidName(NAME_FORMAT)
    return name


def mask_id_number(id_number: str) -> str:
    """Mask an ID number for display: first 4 and last 4 characters, 10 stars between.

    Anything that is not 18 characters long is masked completely.
    """
    number = id_number.strip()
    if len(number) != 18:
        return "*" * len(number)
    return f"{number[:4]}{'*' * 10}{number[-4:]}"


def mask_phone(phone: str) -> str:
    """Mask an 11-digit mobile number as ``138****5678``; anything else completely."""
    number = phone.strip()
    if len(number) != 11:
        return "*" * len(number)
    return f"{number[:3]}****{number[-4:]}"


def mask_name(name: str) -> str:
    """Mask a name as its first character followed by one star per remaining character.

    A one-character name becomes a single star: showing its first character would show all.
    """
    stripped = name.strip()
    if len(stripped) <= 1:
        return "*" * len(stripped)
    return stripped[0] + "*" * (len(stripped) - 1)
