"""CLI commands, one module each. Importing this package registers them on the app."""

from edgekv.commands import adapt, bench, demo, export, inspect, keys, memory, profile, run, stream  # noqa: F401
