"""Board profiles: what a target device offers the runtime (RAM, cores, bandwidth, headroom).

Built-in profiles are JSON files in ``devices/profiles/``; a user passes their own file
with the same fields (see ``docs/devices.md``). Every field is validated on load and a bad
one is an :class:`InputError` that names it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields

from edgekv.configs import Config
from edgekv.errors import InputError
from edgekv.units import parse_size

PROFILE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles")
ISAS = ("aarch64", "x86_64")
BANDWIDTH_KINDS = ("theoretical", "measured")
_MAX_PROFILE_BYTES = 1 << 16


@dataclass(frozen=True)
class DeviceProfile(Config):
    """One target board. Sizes are bytes; bandwidth is GB/s (10**9 bytes per second)."""

    name: str  # short id used on the command line, e.g. "rpi4-4gb"
    title: str  # human name
    ram_bytes: int  # physical RAM
    cores: int  # CPU cores the OS sees
    isa: str  # "aarch64" or "x86_64" (as platform.machine() prints it)
    cpu: str  # CPU description
    isa_features: str  # SIMD / extensions that matter to onnxruntime kernels
    memory_bandwidth_gbps: float  # DRAM bandwidth figure
    bandwidth_kind: str  # "theoretical" (bus peak from a spec) or "measured"
    bandwidth_source: str  # where the figure comes from
    recommended_threads: int  # onnxruntime intra-op threads to use
    os_headroom_bytes: int  # RAM to leave for the OS and page cache
    headroom_source: str = ""  # why that headroom
    notes: str = ""

    def __post_init__(self) -> None:
        for name in ("name", "title", "isa", "cpu", "isa_features", "bandwidth_kind", "bandwidth_source",
                     "headroom_source", "notes"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"device profile field {name!r} must be a string")
        for name in ("name", "title", "cpu", "bandwidth_source"):
            if not getattr(self, name).strip():
                raise InputError(f"device profile field {name!r} must not be empty")
        for name in ("ram_bytes", "cores", "recommended_threads", "os_headroom_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "os_headroom_bytes" else 1):
                raise InputError(f"device profile field {name!r} must be a positive integer, got {value!r}")
        bw = self.memory_bandwidth_gbps
        if isinstance(bw, bool) or not isinstance(bw, (int, float)) or not 0 < bw < 10_000:
            raise InputError(f"device profile field 'memory_bandwidth_gbps' must be a number of GB/s in (0, 10000), "
                             f"got {bw!r}")
        if self.isa not in ISAS:
            raise InputError(f"device profile field 'isa' must be one of {list(ISAS)}, got {self.isa!r}")
        if self.bandwidth_kind not in BANDWIDTH_KINDS:
            raise InputError(f"device profile field 'bandwidth_kind' must be one of {list(BANDWIDTH_KINDS)}, "
                             f"got {self.bandwidth_kind!r}")
        if self.recommended_threads > self.cores:
            raise InputError(f"device profile field 'recommended_threads' ({self.recommended_threads}) exceeds "
                             f"'cores' ({self.cores})")
        if self.os_headroom_bytes >= self.ram_bytes:
            raise InputError(f"device profile field 'os_headroom_bytes' ({self.os_headroom_bytes}) must be less than "
                             f"'ram_bytes' ({self.ram_bytes})")

    @property
    def available_bytes(self) -> int:
        """RAM the runtime may use: RAM minus the OS headroom."""
        return self.ram_bytes - self.os_headroom_bytes

    @classmethod
    def from_dict(cls, data: dict, source: str = "profile") -> DeviceProfile:
        """Validate a JSON object; sizes may be bytes or strings such as "4GiB"."""
        if not isinstance(data, dict):
            raise InputError(f"{source}: a device profile must be a JSON object")
        known = {f.name for f in fields(DeviceProfile)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"{source}: unknown device profile field {unknown[0]!r}; fields are {sorted(known)}")
        required = [f.name for f in fields(DeviceProfile) if f.name not in ("headroom_source", "notes")]
        missing = [name for name in required if name not in data]
        if missing:
            raise InputError(f"{source}: device profile field {missing[0]!r} is missing")
        values = dict(data)
        for name in ("ram_bytes", "os_headroom_bytes"):
            if isinstance(values[name], str):
                try:
                    values[name] = parse_size(values[name])
                except InputError as e:
                    raise InputError(f"{source}: device profile field {name!r}: {e}") from None
        try:
            return DeviceProfile(**values)
        except InputError as e:
            raise InputError(f"{source}: {e}") from None


def builtin_names() -> list[str]:
    """Names of the profiles shipped with edgekv, sorted."""
    return sorted(f[:-5] for f in os.listdir(PROFILE_DIR) if f.endswith(".json"))


def load_profile_file(path: str) -> DeviceProfile:
    """A profile from a JSON file (a user's own board)."""
    try:
        if os.path.getsize(path) > _MAX_PROFILE_BYTES:
            raise InputError(f"{path}: too large to be a device profile")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise InputError(f"{path}: cannot read device profile ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a JSON device profile ({e})") from None
    return DeviceProfile.from_dict(data, path)


def load_profile(name_or_path: str) -> DeviceProfile:
    """A built-in profile by name (``rpi4-4gb``) or a user's profile file (``my-board.json``)."""
    if name_or_path in builtin_names():
        return load_profile_file(os.path.join(PROFILE_DIR, name_or_path + ".json"))
    if os.path.isfile(name_or_path):
        return load_profile_file(name_or_path)
    raise InputError(f"unknown device {name_or_path!r}: use one of {', '.join(builtin_names())} "
                     f"or the path of a profile JSON file (see docs/devices.md)")


def list_profiles() -> list[DeviceProfile]:
    """All built-in profiles, sorted by name."""
    return [load_profile(name) for name in builtin_names()]
