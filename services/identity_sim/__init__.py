"""A SIMULATOR of the provincial identity authority, for local runs and tests only."""
