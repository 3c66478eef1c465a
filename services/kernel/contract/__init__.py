"""Pure code more than one service (or the auditor) needs, and no I/O: the shared kernel of the
domain, kept inside the kernel so that services import only the kernel and the proto contract.

The services meet only in ``proto/`` and here: the policy model and its quote arithmetic
(:mod:`.policy`), personal-data formats and masks (:mod:`.personal_data`), and the budget fold
the ledger decides with and the auditor replays (:mod:`.budget`). No module here imports a
service's package.
"""
