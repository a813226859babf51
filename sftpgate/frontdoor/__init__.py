"""Front doors: they turn what clients do into events, and know nothing else."""
