"""bakehouse operations library: model store, images, remote hosts, deploy."""

__version__ = "0.1.0"
