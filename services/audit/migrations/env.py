"""Alembic's environment for the audit database, run by services/kernel/schema.py."""

from services.kernel.schema import run_env

run_env("audit")
