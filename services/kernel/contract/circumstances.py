"""Format checks, normal forms and masks for what a platform tells us about a consumer beyond
the three factors: device, IP address, delivery address, region code, bank card, bank-reserved
phone and app account (the ``Circumstances`` of a claim or order and the ``Identifiers`` that
link accounts into one person).

Each ``validate_*`` returns the canonical form the blind index is computed over, so that two
spellings of one value index alike (a card typed with spaces, an address with full-width
digits); each ``mask_*`` is what an operator may see. Like personal_data, no exception carries
the rejected value, only a fixed reason code. Pure functions; no I/O.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from typing import Final

from .personal_data import InvalidIdentity

DEVICE_ID_FORMAT: Final = "DEVICE_ID_FORMAT"
IP_FORMAT: Final = "IP_FORMAT"
ADDRESS_LENGTH: Final = "ADDRESS_LENGTH"
ADDRESS_FORMAT: Final = "ADDRESS_FORMAT"
REGION_CODE_FORMAT: Final = "REGION_CODE_FORMAT"
BANK_CARD_FORMAT: Final = "BANK_CARD_FORMAT"
APP_ACCOUNT_FORMAT: Final = "APP_ACCOUNT_FORMAT"

ADDRESS_MAX_LENGTH: Final = 200
# Device fingerprints and app account ids are the platform's own opaque tokens: printable
# ASCII without spaces, bounded.
_TOKEN_RE: Final = re.compile(r"[!-~]{4,128}")
# UnionPay and international cards: 12 to 19 digits (not every issuer's card passes Luhn).
_CARD_RE: Final = re.compile(r"[0-9]{12,19}")
# A 6-digit county code, optionally with the 3-digit township and 3-digit village parts.
REGION_RE: Final = re.compile(r"[1-9][0-9]{5}(?:[0-9]{3}(?:[0-9]{3})?)?")
_SPACES_RE: Final = re.compile(r"[\s\-]+")
_FORBIDDEN_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})


class InvalidCircumstance(InvalidIdentity):
    """A device id, IP, address, region code, card or account is malformed."""

    kind = "identifier"


def validate_token(value: str, reason: str) -> str:
    """An opaque platform token (device id, app account), kept as given."""
    if not _TOKEN_RE.fullmatch(value):
        raise InvalidCircumstance(reason)
    return value


def validate_device_id(value: str) -> str:
    return validate_token(value, DEVICE_ID_FORMAT)


def validate_app_account(value: str) -> str:
    return validate_token(value, APP_ACCOUNT_FORMAT)


def validate_ip(value: str) -> str:
    """An IPv4 or IPv6 address in its compressed canonical form."""
    try:
        return ipaddress.ip_address(value.strip()).compressed
    except ValueError:
        raise InvalidCircumstance(IP_FORMAT) from None


def validate_bank_card(value: str) -> str:
    """A card number, spaces and dashes removed."""
    digits = _SPACES_RE.sub("", value)
    if not _CARD_RE.fullmatch(digits):
        raise InvalidCircumstance(BANK_CARD_FORMAT)
    return digits


def validate_region_code(value: str) -> str:
    """An administrative division code: 6 digits (county), or 9 or 12 with township/village."""
    if not REGION_RE.fullmatch(value):
        raise InvalidCircumstance(REGION_CODE_FORMAT)
    return value


def normalise_address(value: str) -> str:
    """The form addresses are compared in: NFKC (full-width digits and letters fold to ASCII),
    case-folded, whitespace and dashes removed, so that "1 栋 - 201" and "1栋201" are one
    address for address clustering."""
    text = unicodedata.normalize("NFKC", value)
    if any(unicodedata.category(ch) in _FORBIDDEN_CATEGORIES for ch in text if ch not in "\t\n"):
        raise InvalidCircumstance(ADDRESS_FORMAT)
    folded = _SPACES_RE.sub("", text).casefold()
    if not 2 <= len(folded) <= ADDRESS_MAX_LENGTH:
        raise InvalidCircumstance(ADDRESS_LENGTH)
    return folded


def in_region(region_code: str, campaign_regions: tuple[str, ...]) -> bool:
    """Whether a reported region lies inside one of the campaign's regions (a township or
    village code lies inside the county code it starts with)."""
    return any(region_code.startswith(code) for code in campaign_regions)


def mask_token(value: str) -> str:
    """First and last two characters: enough for an operator to tell two tokens apart."""
    return f"{value[:2]}***{value[-2:]}" if len(value) > 4 else "***"


def mask_bank_card(card: str) -> str:
    """The last four digits, as a bank statement shows them."""
    return f"****{card[-4:]}"


def mask_ip(ip: str) -> str:
    """The network part only: an IPv4 /24 or an IPv6 /48."""
    address = ipaddress.ip_address(ip)
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def mask_address(normalised: str) -> str:
    """The first six characters (district and street, usually) and the length."""
    return f"{normalised[:6]}…({len(normalised)})"
