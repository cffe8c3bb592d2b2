"""The model store: declare (models.toml), lock (models.lock), fetch, verify."""
