"""CLI commands, one module each. Importing this package registers them on the app."""

from edgekv.commands import (  # noqa: F401
    adapt,
    bench,
    chat,
    demo,
    export,
    inspect,
    keys,
    memory,
    profile,
    run,
    serve,
    stream,
)
