"""The normal forms and masks of devices, IPs, addresses, regions, cards and accounts."""

from __future__ import annotations

import pytest

from services.kernel.contract import circumstances as c


def test_two_spellings_of_one_address_are_one_address() -> None:
    assert c.normalise_address("坪山区 龙田街道 1栋 - 201") == c.normalise_address(
        "坪山区龙田街道1栋201"
    )
    assert c.normalise_address("Ａ座１０１") == c.normalise_address("a座101")  # full-width folds


@pytest.mark.parametrize("bad", ["", "x", "a\u200bb" * 2, "a" * 201])
def test_an_address_that_is_empty_too_long_or_has_hidden_characters_is_refused(bad: str) -> None:
    with pytest.raises(c.InvalidCircumstance):
        c.normalise_address(bad)


def test_a_card_is_digits_only_and_masked_to_its_last_four() -> None:
    card = c.validate_bank_card("6222 0212 3456 7890")
    assert card == "6222021234567890"
    assert c.mask_bank_card(card) == "****7890"
    for bad in ["12345678901", "62220212345678901234", "6222-0212-3456-789x"]:
        with pytest.raises(c.InvalidCircumstance) as err:
            c.validate_bank_card(bad)
        assert bad not in str(err.value)


def test_ips_are_canonical_and_masked_to_their_network() -> None:
    assert c.validate_ip("2001:0db8:0000::1") == "2001:db8::1"
    assert c.mask_ip("10.1.2.3") == "10.1.2.0/24"
    assert c.mask_ip("2001:db8:1:2::1") == "2001:db8:1::/48"
    with pytest.raises(c.InvalidCircumstance):
        c.validate_ip("10.1.2")


def test_a_township_code_lies_inside_its_county() -> None:
    assert c.in_region(c.validate_region_code("440310001"), ("440310",))
    assert not c.in_region(c.validate_region_code("440311"), ("440310",))
    for bad in ["44031", "4403100", "040310", "44031000a"]:
        with pytest.raises(c.InvalidCircumstance):
            c.validate_region_code(bad)


def test_tokens_are_bounded_printable_and_masked() -> None:
    assert c.validate_device_id("dev-1234-abcd") == "dev-1234-abcd"
    assert c.mask_token("dev-1234-abcd") == "de***cd"
    for bad in ["abc", "has space", "x" * 129, "设备号码"]:
        with pytest.raises(c.InvalidCircumstance):
            c.validate_app_account(bad)
