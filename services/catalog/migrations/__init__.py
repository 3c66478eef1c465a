"""The catalog database's schema revisions (Alembic): env.py and versions/, run by
services/kernel/schema.py (`python -m services.catalog migrate`)."""
