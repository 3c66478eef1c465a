"""The live fund-monitoring dashboard (issue 13, "Fund monitoring"): a small read-only web
server beside the services, not inside one.

It acts as an auditor: it reads the ledger's pools (``GetBudget``), catalog's policy, every
service's outbox status and the audit log (which holds every event of every service) through
their gRPC APIs, never their tables, and shows them on one page that updates itself
(server-sent events). :mod:`.figures` folds the log (pure), :mod:`.monitor` does the reads,
:mod:`.server` serves the page and checks the login; ``static/`` holds the page, plain
HTML/CSS/JS with its charts drawn as inline SVG by the page itself (no library, no CDN: it works
offline). ``subsidyctl dashboard`` runs it; ``subsidyctl up`` starts it and prints its URL.
"""
