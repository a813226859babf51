"""The PostgreSQL backend (``database.url: postgresql://…``): schema migrations, the pooled
async connections, and the adapters behind the storage ports. All its SQL lives here."""
