"""Storage: the ports (:mod:`.ports`), versioned migrations, and the backend for a config."""
