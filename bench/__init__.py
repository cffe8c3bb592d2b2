"""Benchmarks: each writes bench/results/<name>.json and the table generated from it (`python -m bench.<name>`)."""
