"""python -m services.identity_sim: the identity-authority SIMULATOR."""

from .simulator import main

raise SystemExit(main())
