"""python -m services.audit [serve|migrate]"""

from services.kernel.app import main

from .service import SPEC

raise SystemExit(main(SPEC))
