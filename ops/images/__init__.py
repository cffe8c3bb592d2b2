"""Images: build (optionally baking models) and push, with Docker or podman."""
