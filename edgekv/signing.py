"""Ed25519 signatures for memories, updates and exports: a board can tell its owner's files.

The owner makes a key pair once on the host (``edgekv keys generate``) and keeps the private
key there; boards get the public key (``--trust PUBKEY`` or ``EDGEKV_TRUST``). Every signed
file ``PATH`` gets a detached signature ``PATH.sig``: a small JSON object

    {"format": "edgekv-signature", "version": 1, "algorithm": "ed25519",
     "purpose": "edgekv-memory-v1", "key_id": "<16 hex>", "sha256": "<hex>", "size": N,
     "claims": {...}, "signature": "<base64 of 64 bytes>"}

``key_id`` is the first 16 hex digits of the sha256 of the raw 32-byte public key. The
signature is over the domain-separated message ``b"edgekv-signature-v1\\0"`` + the canonical
JSON (sorted keys, no spaces) of ``purpose``, ``sha256``, ``size`` and ``claims``: so a memory
signature is not an update signature (the purpose), a truncated file is refused (the size),
and extra facts can be signed with the file (an update's ``claims`` hold the sha256 and size
of the memory it produces). ``key_id`` is not signed: a changed one only changes which key the
verifier says signed it.

Keys are PEM files: the private key PKCS#8 (unencrypted; written atomically with mode 0600),
the public key SubjectPublicKeyInfo, both readable by ``openssl pkey``. Verifying also takes
the raw 32-byte public key as bytes.

The cryptography is the ``cryptography`` package (optional extra ``edgekv[sign]``), imported
only when a key is used: without it, signing or trusting raises
:class:`~edgekv.errors.MissingDependencyError`; nothing else needs it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from typing import Any

from edgekv.atomic import atomic_file, storage_errors, write_file_atomic
from edgekv.errors import InputError, MissingDependencyError, SignatureError

SIG_SUFFIX = ".sig"
SIG_FORMAT = "edgekv-signature"
SIG_VERSION = 1
ALGORITHM = "ed25519"
DOMAIN = b"edgekv-signature-v1\0"
PURPOSES = {"memory": "edgekv-memory-v1", "update": "edgekv-update-v1", "export": "edgekv-export-v1"}
_WHAT = {v: k for k, v in PURPOSES.items()}  # purpose string -> short name, for messages
KEY_NAME = "edgekv-signing"  # generate_keypair's files: NAME.key (private), NAME.pub (public)
TRUST_ENV = "EDGEKV_TRUST"
MAX_SIG_BYTES = 64 << 10  # a signature file is < 1 KB; refuse hostile sizes before reading
MAX_KEY_BYTES = 64 << 10
KEY_ID_HEX = 16
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


# --- the library ---------------------------------------------------------------------------------
def _crypto():
    """The ``cryptography`` modules edgekv uses, or MissingDependencyError."""
    try:
        from cryptography import exceptions
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise MissingDependencyError("signing and verifying need the 'cryptography' package: "
                                     "pip install 'edgekv[sign]'") from None
    return ed25519, serialization, exceptions


def purpose_string(purpose: str) -> str:
    """'memory' / 'update' / 'export' (or the full string) -> 'edgekv-memory-v1' etc."""
    if purpose in PURPOSES:
        return PURPOSES[purpose]
    if purpose in _WHAT:
        return purpose
    raise ValueError(f"unknown signature purpose {purpose!r} (one of {sorted(PURPOSES)})")


def signature_path(path: str | os.PathLike) -> str:
    return os.fspath(path) + SIG_SUFFIX


def _raw_public(public_key: Any) -> bytes:
    _, serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Any) -> str:
    """The id a signature names its key by: sha256 of the raw public key, first 16 hex digits."""
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:KEY_ID_HEX]


# --- keys ----------------------------------------------------------------------------------------
def generate_keypair(folder: str | os.PathLike, name: str = KEY_NAME) -> tuple[str, str]:
    """Write a new key pair ``folder/NAME.key`` (private, PEM PKCS#8, mode 0600) and
    ``folder/NAME.pub`` (public, PEM); refuse to replace either. -> (private path, public path)"""
    ed25519, serialization, _ = _crypto()
    folder = os.fspath(folder)
    priv_path, pub_path = os.path.join(folder, name + ".key"), os.path.join(folder, name + ".pub")
    for p in (priv_path, pub_path):
        if os.path.lexists(p):
            raise InputError(f"{p} already exists: refusing to replace a signing key (move it away, or pass "
                             f"another --out)")
    with storage_errors(folder, "create the folder"):
        os.makedirs(folder, mode=0o700, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    with atomic_file(priv_path, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # before a byte of the key is written
        f.write(private_pem)
    write_file_atomic(pub_path, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                               serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path


def _read_key_file(path: str, what: str) -> bytes:
    if not os.path.isfile(path):
        raise InputError(f"{path}: {what} not found")
    if os.path.getsize(path) > MAX_KEY_BYTES:
        raise InputError(f"{path}: too large for a {what}")
    with storage_errors(path, "read it"), open(path, "rb") as f:
        return f.read()


def load_private_key(key: Any) -> Any:
    """A private key file (PEM, as :func:`generate_keypair` writes) -> Ed25519PrivateKey (a loaded
    key passes through)."""
    ed25519, serialization, _ = _crypto()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    path = os.fspath(key)
    data = _read_key_file(path, "private signing key")
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise InputError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise InputError(f"{path}: not an Ed25519 private key (make one with `edgekv keys generate`)")
    return loaded


def load_public_key(key: Any) -> Any:
    """A trusted public key: a PEM file path, PEM bytes, the raw 32 bytes, or a loaded key."""
    ed25519, serialization, _ = _crypto()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, (bytes, bytearray)):
        where, data = "the trusted key", bytes(key)
    else:
        where = os.fspath(key)
        data = _read_key_file(where, "trusted public key")
    try:
        loaded = ed25519.Ed25519PublicKey.from_public_bytes(data) if len(data) == 32 \
            else serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise InputError(f"{where}: not a PEM or raw 32-byte public key ({e})") from None
    if not isinstance(loaded, ed25519.Ed25519PublicKey):
        raise InputError(f"{where}: not an Ed25519 public key (use the .pub file of `edgekv keys generate`)")
    return loaded


def trusted_key(trust: Any = None) -> Any:
    """The public key files must be signed by: ``trust`` (path, bytes or key), else the file the
    ``EDGEKV_TRUST`` environment variable names, else None (nothing is checked)."""
    if trust is None:
        trust = os.environ.get(TRUST_ENV)
    return load_public_key(trust) if trust else None  # an empty value (EDGEKV_TRUST=) is unset


# --- hashing and the signed message --------------------------------------------------------------
def fd_digest(fd: int) -> tuple[str, int]:
    """(sha256 hex, size) of the open file ``fd``, read with ``pread`` (its offset is untouched)."""
    h, offset = hashlib.sha256(), 0
    while chunk := os.pread(fd, _CHUNK, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest(), offset


def file_digest(path: str) -> tuple[str, int]:
    """(sha256 hex, size) of the file at ``path``, read through one descriptor."""
    with storage_errors(path, "read it"):
        fd = os.open(path, os.O_RDONLY)
        try:
            return fd_digest(fd)
        finally:
            os.close(fd)


def message(purpose: str, sha256: str, size: int, claims: dict) -> bytes:
    """The bytes the signature is over (domain-separated, canonical JSON)."""
    body = {"purpose": purpose, "sha256": sha256, "size": size, "claims": claims}
    return DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# --- signing -------------------------------------------------------------------------------------
def signature_record(digest: tuple[str, int], private_key: Any, purpose: str, claims: dict | None = None) -> dict:
    """The signature object for a file of ``digest`` (sha256 hex, size), not written anywhere."""
    key = load_private_key(private_key)
    purpose, claims = purpose_string(purpose), dict(claims or {})
    sha256, size = digest
    return {"format": SIG_FORMAT, "version": SIG_VERSION, "algorithm": ALGORITHM, "purpose": purpose,
            "key_id": key_id(key.public_key()), "sha256": sha256, "size": size, "claims": claims,
            "signature": base64.b64encode(key.sign(message(purpose, sha256, size, claims))).decode()}


def write_signature(path: str | os.PathLike, record: dict) -> str:
    """Write ``record`` as ``PATH.sig`` (atomically); return its path."""
    sig = signature_path(path)
    write_file_atomic(sig, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return sig


def sign_file(path: str | os.PathLike, private_key: Any, purpose: str, claims: dict | None = None,
              extra: dict | None = None) -> str:
    """Sign the file ``path`` for ``purpose`` ('memory', 'update', 'export') with the private key
    (file or loaded key): writes ``PATH.sig`` atomically and returns its path. ``claims`` are
    signed with the file; ``extra`` fields are stored beside them unsigned."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file to sign")
    return write_signature(path, {**(extra or {}), **signature_record(file_digest(path), private_key, purpose,
                                                                       claims)})


# --- verifying -----------------------------------------------------------------------------------
def read_signature(path: str | os.PathLike) -> dict:
    """The signature object of ``path`` (``PATH.sig``), checked for shape; SignatureError if it is
    missing or malformed."""
    path, sig = os.fspath(path), signature_path(path)
    if not os.path.isfile(sig):
        raise SignatureError(f"{path}: not signed ({os.path.basename(sig)} is missing); sign it on the host with "
                             f"--sign KEY, or do not ask for a trusted signature")
    try:
        if os.path.getsize(sig) > MAX_SIG_BYTES:
            raise ValueError(f"larger than {MAX_SIG_BYTES} bytes")
        with open(sig, encoding="utf-8") as f:
            record = json.load(f)
        check_record(record)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SignatureError(f"{sig}: not a valid edgekv signature ({e})") from None
    return record


def check_record(record: Any) -> None:
    """Raise ValueError naming the first field of a signature object that is missing or wrong."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    for name, typ in (("format", str), ("version", int), ("algorithm", str), ("purpose", str), ("key_id", str),
                      ("sha256", str), ("size", int), ("claims", dict), ("signature", str)):
        if not isinstance(record.get(name), typ) or isinstance(record.get(name), bool):
            raise ValueError(f"field {name!r} is missing or not {typ.__name__}")
    if record["format"] != SIG_FORMAT or record["version"] != SIG_VERSION:
        raise ValueError(f"format {record['format']!r} version {record['version']} is not "
                         f"{SIG_FORMAT!r} version {SIG_VERSION}")
    if record["algorithm"] != ALGORITHM:
        raise ValueError(f"algorithm {record['algorithm']!r} is not {ALGORITHM!r}")
    if not _HEX64.fullmatch(record["sha256"]) or record["size"] < 0:
        raise ValueError("field 'sha256' or 'size' is malformed")


def _describe(purpose: str) -> str:
    article = {"memory": "a memory", "update": "an update", "export": "an export"}
    return f"{article.get(_WHAT.get(purpose, ''), 'something else')} ({purpose})"


def check_signed_by(path: str, record: dict, public_key: Any, purpose: str) -> None:
    """The record is ``purpose``'s, by ``public_key``, and its signature verifies (the file's
    bytes are not looked at: :func:`check_contents`)."""
    _, _, exceptions = _crypto()
    sig = signature_path(path)
    want = key_id(public_key)
    if record["key_id"] != want:
        raise SignatureError(f"{path}: signed by key {record['key_id']}, not by the trusted key {want}")
    if record["purpose"] != purpose:
        raise SignatureError(f"{path}: its signature is for {_describe(record['purpose'])}, not for "
                             f"{_describe(purpose)}")
    try:
        raw = base64.b64decode(record["signature"], validate=True)
        public_key.verify(raw, message(purpose, record["sha256"], record["size"], record["claims"]))
    except (ValueError, exceptions.InvalidSignature):
        raise SignatureError(f"{sig}: the signature does not verify with the trusted key (the signature file "
                             f"was altered)") from None


def check_contents(path: str, record: dict, digest: tuple[str, int]) -> None:
    """The file's (sha256, size) ``digest`` is the one the record signs."""
    sha256, size = digest
    if size != record["size"]:
        raise SignatureError(f"{path}: {size} bytes, but {record['size']} bytes were signed (the file is truncated "
                             f"or was replaced)")
    if sha256 != record["sha256"]:
        raise SignatureError(f"{path}: its contents differ from what was signed (changed after signing, or the "
                             f"signature is for another version of the file)")


def verify_record(path: str, record: dict, trusted: Any, purpose: str, digest: tuple[str, int]) -> str:
    """Check ``record`` (a signature object) for the file of ``digest``; -> the key id."""
    public_key = load_public_key(trusted)
    check_signed_by(path, record, public_key, purpose_string(purpose))
    check_contents(path, record, digest)
    return record["key_id"]


def verify_file(path: str | os.PathLike, trusted: Any, purpose: str, fd: int | None = None) -> str:
    """Check that ``path`` is signed by the ``trusted`` public key (file path, PEM or raw bytes, or
    a loaded key) for ``purpose`` and unchanged since; -> the key id. ``fd``: hash this open
    descriptor of the file instead of opening ``path`` again (what is checked is what is used).

    Raises :class:`SignatureError` (exit code 8): no signature, another key, another purpose, a
    signature that does not verify, a truncated or changed file."""
    path = os.fspath(path)
    if fd is None and not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    record = read_signature(path)
    return verify_record(path, record, trusted, purpose, fd_digest(fd) if fd is not None else file_digest(path))


# --- what the commands sign ----------------------------------------------------------------------
def export_manifest(folder: str | os.PathLike) -> str:
    from edgekv.manifest import MANIFEST_FILE

    return os.path.join(os.fspath(folder), MANIFEST_FILE)


def sign_export(folder: str | os.PathLike, private_key: Any) -> str:
    """Sign an export folder: its ``manifest.json`` (which holds every artifact's sha256, checked
    at load) for purpose export -> ``manifest.json.sig``."""
    return sign_file(export_manifest(folder), private_key, "export")


def verify_export(folder: str | os.PathLike, trusted: Any) -> str:
    """The export folder's manifest is signed by the trusted key; -> key id. The artifacts are
    then covered by the manifest's hashes (``read_manifest(verify_hashes=True)``)."""
    return verify_file(export_manifest(folder), trusted, "export")


def sign_memory(path: str | os.PathLike, private_key: Any, expect_generation: int | None = None) -> str:
    """Sign a memory file -> ``PATH.sig``. ``expect_generation``: the state the caller committed;
    if another writer has committed since, nothing is signed (the hash is read through the
    descriptor whose header was checked, so the signature is for that generation)."""
    from edgekv.errors import MismatchError
    from edgekv.format import Memory

    path = os.fspath(path)
    key = load_private_key(private_key)
    with Memory(path) as mem:
        if expect_generation is not None and mem.generation != expect_generation:
            raise MismatchError(f"{path}: changed by another writer (generation {mem.generation}, not "
                                f"{expect_generation}) before it was signed; not signed: sign it again")
        record = signature_record(fd_digest(mem.fileno()), key, "memory",
                                  {"generation": mem.generation})
    return write_signature(path, record)


def verify_memory(mem: Any, trusted: Any) -> str:
    """An open :class:`~edgekv.format.Memory` is signed by the trusted key (hashed through its
    own descriptor: the bytes checked are the bytes it reads); -> key id."""
    return verify_file(mem.path, trusted, "memory", fd=mem.fileno())


# --- updates: the signature of the memory they produce travels with them -------------------------
def sign_update(update: str | os.PathLike, new_memory: str | os.PathLike, private_key: Any) -> str:
    """Sign an update (``edgekv memory diff``) -> ``UPDATE.sig``. Its claims are the generations and
    the sha256 / size of the memory it produces (``new_memory``, which must be that memory); the
    memory signature of that result rides along (``result``), so a board that applies the update
    can write ``MEM.ekv.sig`` without holding a private key (:func:`adopt_result_signature`)."""
    from edgekv.errors import MismatchError
    from edgekv.format import Memory
    from edgekv.format.update import read_update

    key, info = load_private_key(private_key), read_update(update)
    with Memory(new_memory) as mem:
        digest, generation = fd_digest(mem.fileno()), mem.generation
    if digest[0] != info["new_sha256"]:
        raise MismatchError(f"{new_memory} is not the memory {update} produces (sha256 differs); not signed")
    result = signature_record(digest, key, "memory", {"generation": generation})
    claims = {"base_generation": info["base_generation"], "new_generation": info["new_generation"],
              "new_sha256": digest[0], "new_size": digest[1]}
    return sign_file(update, key, "update", claims, extra={"result": result})


def verify_update(update: str | os.PathLike, trusted: Any) -> dict:
    """Check that ``update`` is signed by the trusted key for purpose update and carries a memory
    signature, by the same key, of the memory it produces; -> that memory signature (to adopt
    once the update is applied). Nothing is applied here."""
    from edgekv.format.update import read_update

    update, key = os.fspath(update), load_public_key(trusted)
    record = read_signature(update)
    verify_record(update, record, key, "update", file_digest(update))
    result = record.get("result")
    try:
        check_record(result)
    except ValueError as e:
        raise SignatureError(f"{signature_path(update)}: no valid signature of the memory it produces ({e}); sign "
                             f"the update again with `edgekv memory diff ... --sign KEY`") from None
    check_signed_by(update, result, key, PURPOSES["memory"])
    new_sha256 = read_update(update)["new_sha256"]
    if not result["sha256"] == record["claims"].get("new_sha256") == new_sha256:
        raise SignatureError(f"{update}: its signature is for another result than the update produces (sha256 "
                             f"differs); make and sign the update again")
    return result


def adopt_result_signature(memory: str | os.PathLike, result: dict) -> str:
    """After an update is applied: write its result's memory signature (checked by
    :func:`verify_update`) as ``MEM.ekv.sig``, once the memory's bytes are that result."""
    memory = os.fspath(memory)
    check_contents(memory, result, file_digest(memory))
    return write_signature(memory, result)
