"""CLI commands, one module each. Importing this package registers them on the app."""

from edgekv.commands import adapt, demo, export, inspect, profile, run  # noqa: F401
