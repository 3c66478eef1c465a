"""The catalog schema's revisions, oldest first (services/kernel/schema.py runs them)."""
