"""Alembic's environment for the ledger database, run by services/kernel/schema.py."""

from services.kernel.schema import run_env

run_env("ledger")
