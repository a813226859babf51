"""Durable jobs: rows in the journal database, leased by workers."""
