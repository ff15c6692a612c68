"""CLI commands, one module each. Importing this package registers them on the app."""

from edgekv.commands import demo, inspect, profile, run  # noqa: F401
