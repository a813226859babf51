"""The audit journal: SQLite storage, the group-commit writer, queries and formats."""
