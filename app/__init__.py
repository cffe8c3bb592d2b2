"""The inference service: loads a model only from a verified store path and serves it."""
