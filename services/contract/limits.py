"""The limits every service and the policy agree on, defined once.

A request field, a policy document and a quote are all checked against these same numbers
(the kernel's request validation and ``services.contract.policy`` import them from here), so
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
