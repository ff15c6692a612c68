"""The edgekv memory file (``.ekv``, format version 2; version 1 is read too): the only code
that touches its bytes.

``docs/memory-format.md`` describes every byte. Three modules:

* :mod:`edgekv.format.layout`: constants, struct formats, :class:`MemorySpec`,
  :class:`Calibration`, :class:`Entry`, size arithmetic and checksums;
* :mod:`edgekv.format.reader`: :class:`Memory`, the validating reader;
* :mod:`edgekv.format.writer`: :func:`create_memory` and :func:`commit_update`, the atomic
  writers;
* :mod:`edgekv.format.update`: update files (``.ekvu``): :func:`write_update` (two states of a
  memory -> the slots that differ), :class:`Update` (the validating parser) and
  :func:`apply_update` (atomic, on the device, no torch).

The public names are re-exported here (``from edgekv.format import Memory``). Code that
replaces a helper for a test patches the module that uses it (e.g.
``edgekv.format.writer._copy_file``), not this package.
"""

from edgekv.format.layout import (
    ALIGN,
    FLAG_OCCUPIED,
    FORMAT_VERSION,
    HEADER,
    HEADER_FIELDS,
    MAGIC,
    MAX_SLOTS,
    MAX_TASKS,
    MAX_TOP_K,
    PAYLOAD_CODES,
    PAYLOAD_NAMES,
    POOLING_CODES,
    POOLING_NAMES,
    READ_VERSIONS,
    SOURCE_ID_BYTES,
    TABLE_DTYPE,
    TABLE_ENTRY,
    TABLE_ENTRY_BYTES,
    TASK_NAME_BYTES,
    Calibration,
    Entry,
    MemorySpec,
)
from edgekv.format.reader import RELEASE_ALIGN, Memory, open_memory
from edgekv.format.update import (
    UPDATE_MAGIC,
    UPDATE_VERSION,
    Update,
    apply_update,
    read_update,
    write_update,
)
from edgekv.format.writer import commit_update, create_memory

__all__ = [
    "ALIGN", "FLAG_OCCUPIED", "FORMAT_VERSION", "HEADER", "HEADER_FIELDS", "MAGIC", "MAX_SLOTS", "MAX_TASKS",
    "MAX_TOP_K", "PAYLOAD_CODES", "PAYLOAD_NAMES", "POOLING_CODES", "POOLING_NAMES", "READ_VERSIONS",
    "RELEASE_ALIGN", "SOURCE_ID_BYTES", "TABLE_DTYPE", "TABLE_ENTRY", "TABLE_ENTRY_BYTES", "TASK_NAME_BYTES",
    "Calibration", "Entry", "Memory", "MemorySpec", "commit_update", "create_memory", "open_memory",
    "UPDATE_MAGIC", "UPDATE_VERSION", "Update", "apply_update", "read_update", "write_update",
]
