"""Synthetic identities for tests, generated at run time.

Never commit a literal valid resident ID number (other than the two public GB 11643 examples):
a random-looking valid number may be a real person's. Tests get theirs from these generators,
seeded so failures reproduce.
"""

from __future__ import annotations

import datetime as dt
import random
import re
from dataclasses import dataclass
from typing import Final

from hypothesis import strategies as st

PINGSHAN: Final = "440310"  # Pingshan district, Shenzhen

# Deliberately a second implementation of the GB 11643-1999 check (not imported from the code
# under test), so a bug there cannot make these fixtures agree with it.
_WEIGHTS: Final = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CHECK: Final = "10X98765432"
_ADDRESS_RE: Final = re.compile(r"[1-9][0-9]{5}")
_EARLIEST_BIRTH: Final = dt.date(1940, 1, 1)
_LATEST_BIRTH: Final = dt.date(2006, 12, 31)

_SURNAMES: Final = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗高郑梁谢宋唐许邓冯韩曹"
_GIVEN: Final = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华玉兰文建国红梅志"
_MOBILE_SECOND_DIGITS: Final = "3456789"


@dataclass(frozen=True, slots=True)
class Person:
    """A synthetic consumer: the three factors the identity check compares."""

    name: str
    id_number: str
    phone: str


def check_char(first17: str) -> str:
    """GB 11643-1999 check character of 17 digits."""
    total = sum(int(d) * w for d, w in zip(first17, _WEIGHTS, strict=True))
    return _CHECK[total % 11]


def with_check_char(first17: str) -> str:
    """Complete 17 digits into an 18-character number with a correct check character (the
    other parts need not be valid: used to build numbers that fail only another rule)."""
    return first17 + check_char(first17)


def make_id_number(
    rng: random.Random,
    *,
    address: str = PINGSHAN,
    birth: dt.date | None = None,
    male: bool | None = None,
) -> str:
    """A valid 18-character resident ID number; random birth (1940..2006) and sex unless
    given. The 17th digit is odd for men."""
    if not _ADDRESS_RE.fullmatch(address):
        raise ValueError("address must be a 6-digit administrative code not starting with 0")
    if birth is None:
        span = (_LATEST_BIRTH - _EARLIEST_BIRTH).days
        birth = _EARLIEST_BIRTH + dt.timedelta(days=rng.randrange(span + 1))
    if male is None:
        male = rng.random() < 0.5
    sex_digit = rng.choice("13579" if male else "02468")
    sequence = f"{rng.randrange(100):02d}{sex_digit}"
    return with_check_char(f"{address}{birth:%Y%m%d}{sequence}")


def make_phone(rng: random.Random) -> str:
    """A well-formed 11-digit mainland mobile number."""
    rest = "".join(rng.choice("0123456789") for _ in range(9))
    return f"1{rng.choice(_MOBILE_SECOND_DIGITS)}{rest}"


def make_name(rng: random.Random) -> str:
    """A Chinese name: one surname character and one or two given-name characters."""
    given = "".join(rng.choice(_GIVEN) for _ in range(rng.choice((1, 2))))
    return rng.choice(_SURNAMES) + given


def make_person(rng: random.Random) -> Person:
    """A synthetic consumer with a valid name, ID number (Pingshan) and phone."""
    return Person(name=make_name(rng), id_number=make_id_number(rng), phone=make_phone(rng))


# Hypothesis strategies over the same generators (shrink towards simple values).
addresses = st.from_regex(r"[1-9][0-9]{5}", fullmatch=True)
births = st.dates(min_value=dt.date(1900, 1, 1), max_value=_LATEST_BIRTH)


@st.composite
def id_numbers(draw: st.DrawFn) -> str:
    """Valid resident ID numbers with any address code, birth date and sex."""
    return make_id_number(
        draw(st.randoms(use_true_random=False)),
        address=draw(addresses),
        birth=draw(births),
        male=draw(st.booleans()),
    )


persons = st.builds(make_person, st.randoms(use_true_random=False))
