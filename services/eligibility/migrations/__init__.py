"""The eligibility database's schema revisions (Alembic): env.py and versions/, run by
services/kernel/schema.py (`python -m services.eligibility migrate`)."""
