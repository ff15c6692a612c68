"""The small set of exceptions edgekv raises for problems a user can fix.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``; nothing
else in edgekv should reach a user as a traceback. Exit codes (documented in README):

    1  generic edgekv error
    2  bad command-line usage (typer's own)
    3  bad input (arguments, task data, prompts, sizes)
    4  a file is corrupt or not an edgekv file
    5  artifacts and memory do not belong together (fingerprint, shapes, hashes)
    6  a budget too small / capacity exceeded
    7  a required optional component is missing (e.g. host extra not installed)
    8  a signature is missing, invalid, or not by the trusted key (``--trust``)
"""

from __future__ import annotations


class EdgeKVError(Exception):
    """Base class: a problem the user can act on. The message says what and what to do."""

    exit_code = 1


class InputError(EdgeKVError, ValueError):
    """A bad argument, size, prompt or data record."""

    exit_code = 3


class CorruptFileError(EdgeKVError):
    """A file exists but is not a valid edgekv file (magic, version, checksum, size)."""

    exit_code = 4


class MismatchError(EdgeKVError):
    """Files that must belong together do not (fingerprint, shapes, hashes)."""

    exit_code = 5


class BudgetError(EdgeKVError, ValueError):
    """A byte budget cannot hold what was asked for."""

    exit_code = 6


class MissingDependencyError(EdgeKVError, ImportError):
    """An optional component (e.g. the host tools) is not installed."""

    exit_code = 7


class SignatureError(EdgeKVError):
    """A file that must be signed by the trusted key is not: no signature, another key, a
    signature that does not verify, another purpose, or contents that differ from what was signed."""

    exit_code = 8
