"""Real servers on loopback for the tests and the benchmarks: the hub (olah), git-lfs repos, SSH and systemd hosts, containers, the app, proxies.

Shared by tests/ and bench/, so neither imports the other.
"""
