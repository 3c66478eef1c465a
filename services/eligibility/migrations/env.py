"""Alembic's environment for the eligibility database, run by services/kernel/schema.py."""

from services.kernel.schema import run_env

run_env("eligibility")
