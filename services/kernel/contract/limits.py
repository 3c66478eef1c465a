"""The limits every service and the policy agree on, defined once.

A request field, a policy document and a quote are all checked against these same numbers
(the kernel's request validation and ``services.kernel.contract.policy`` import them from here), so
an amount one part accepts is never refused by another.
"""

from __future__ import annotations

from typing import Final

# Money is integer fen. 100 million yuan is far above any household item, so anything larger
# is a unit or data error, not a sale.
MIN_PRICE_FEN: Final = 1
MAX_PRICE_FEN: Final = 10**10

# Energy-efficiency grades 1 (best) .. 5; 0 in a request or an event means "no grade".
MIN_GRADE: Final = 1
MAX_GRADE: Final = 5
NO_GRADE: Final = 0

# A policy's amounts, bounded so that nothing computed from them leaves int64 (the proto's and
# PostgreSQL's bigint): a quote is at most price * 10000 bp, and a subsidy is never more than a
# price, so a cap or ceiling above MAX_PRICE_FEN could only be a typo (a yuan amount keyed in
# as fen * 100, an extra digit) that would then reach budgets and reports.
MAX_CAP_FEN: Final = MAX_PRICE_FEN
MAX_PRICE_CEILING_FEN: Final = MAX_PRICE_FEN
# Counts and day spans of a policy travel as int32 in subsidy.v1.Policy; these bounds are far
# above any programme (a billion items a day per category, ten years) and far below 2**31.
MAX_POLICY_COUNT: Final = 10**9
MAX_POLICY_DAYS: Final = 3660
INT64_MAX: Final = 2**63 - 1
