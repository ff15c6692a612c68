"""Signed memories, updates and exports (edgekv.signing, ``--sign`` / ``--trust``).

Each refusal is checked with its message: no signature, another key, a signature that does
not verify (a flipped bit in the .sig), another purpose, a truncated or changed file; the
CLI with its exit code 8. Then the tiny model end to end: ``export --sign``, a signed memory,
``run --trust`` (and EDGEKV_TRUST) accepting it and refusing unsigned or foreign files.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat

import pytest
from test_mismatch import memory_for
from typer.testing import CliRunner

from edgekv import signing
from edgekv.cli import app
from edgekv.errors import InputError, MismatchError, MissingDependencyError, SignatureError
from edgekv.format import Memory, commit_update

pytest.importorskip("cryptography")
runner = CliRunner()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two key pairs: {"a": (private, public), "b": (private, public)}."""
    base = tmp_path_factory.mktemp("keys")
    return {name: signing.generate_keypair(base / name) for name in ("a", "b")}


@pytest.fixture()
def signed(tmp_path, keys) -> str:
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 40)
    signing.sign_file(path, keys["a"][0], "memory")
    return str(path)


def refused(path, trusted, purpose, phrase):
    with pytest.raises(SignatureError) as e:
        signing.verify_file(path, trusted, purpose)
    assert str(e.value) == phrase, str(e.value)
    assert "\n" not in str(e.value) and e.value.exit_code == 8


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def kid(public_path) -> str:
    return signing.key_id(signing.load_public_key(public_path))


# --- the library --------------------------------------------------------------------------------------
def test_round_trip_and_the_signature_file(signed, keys):
    priv, pub = keys["a"]
    assert signing.verify_file(signed, pub, "memory") == kid(pub)
    rec = json.load(open(signed + ".sig"))
    assert rec["format"] == "edgekv-signature" and rec["version"] == 1 and rec["algorithm"] == "ed25519"
    assert rec["purpose"] == "edgekv-memory-v1" and rec["size"] == os.path.getsize(signed)
    assert rec["sha256"] == signing.file_digest(signed)[0] and len(rec["key_id"]) == 16
    # the key as raw 32 bytes, PEM bytes, or a loaded key; the full purpose string
    raw = signing._raw_public(signing.load_public_key(pub))
    for trusted in (raw, open(pub, "rb").read(), signing.load_public_key(pub)):
        assert signing.verify_file(signed, trusted, "edgekv-memory-v1") == kid(pub)


def test_no_signature(tmp_path, keys):
    path = tmp_path / "m.ekv"
    path.write_bytes(b"x" * 10)
    refused(str(path), keys["a"][1], "memory",
            f"{path}: not signed (m.ekv.sig is missing); sign it on the host with --sign KEY, or do not ask for "
            f"a trusted signature")


def test_signed_by_another_key(signed, keys):
    refused(signed, keys["b"][1], "memory",
            f"{signed}: signed by key {kid(keys['a'][1])}, not by the trusted key {kid(keys['b'][1])}")


def test_a_key_id_rewritten_to_the_trusted_one_does_not_help(signed, keys):
    rec = json.load(open(signed + ".sig"))
    rec["key_id"] = kid(keys["b"][1])
    open(signed + ".sig", "w").write(json.dumps(rec))
    refused(signed, keys["b"][1], "memory",
            f"{signed}.sig: the signature does not verify with the trusted key (the signature file was altered)")


def test_wrong_purpose(signed, keys):
    refused(signed, keys["a"][1], "update",
            f"{signed}: its signature is for a memory (edgekv-memory-v1), not for an update (edgekv-update-v1)")
    # rewriting the purpose in the .sig breaks the signature
    rec = json.load(open(signed + ".sig"))
    rec["purpose"] = "edgekv-update-v1"
    open(signed + ".sig", "w").write(json.dumps(rec))
    refused(signed, keys["a"][1], "update",
            f"{signed}.sig: the signature does not verify with the trusted key (the signature file was altered)")


def test_truncated_file(signed, keys):
    size = os.path.getsize(signed)
    os.truncate(signed, size - 1)
    refused(signed, keys["a"][1], "memory",
            f"{signed}: {size - 1} bytes, but {size} bytes were signed (the file is truncated or was replaced)")


def test_flipped_bit_in_the_file(signed, keys):
    flip(signed, 1234)
    refused(signed, keys["a"][1], "memory",
            f"{signed}: its contents differ from what was signed (changed after signing, or the signature is for "
            f"another version of the file)")


@pytest.mark.parametrize("field", ["signature", "sha256", "size", "claims"])
def test_flipped_bit_in_the_signature_file(signed, keys, field):
    rec = json.load(open(signed + ".sig"))
    if field == "signature":
        raw = bytearray(base64.b64decode(rec["signature"]))
        raw[5] ^= 0x01
        rec["signature"] = base64.b64encode(bytes(raw)).decode()
    elif field == "sha256":
        rec["sha256"] = ("1" if rec["sha256"][0] != "1" else "2") + rec["sha256"][1:]
    elif field == "size":
        rec["size"] ^= 1
    else:
        rec["claims"] = {"generation": 99}
    open(signed + ".sig", "w").write(json.dumps(rec))
    refused(signed, keys["a"][1], "memory",
            f"{signed}.sig: the signature does not verify with the trusted key (the signature file was altered)")


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"format": "edgekv-signature"}', b"\xff" * 10,
                                     b'{"a": ' * 100_000])
def test_garbage_signature_file(signed, keys, content):
    open(signed + ".sig", "wb").write(content)
    with pytest.raises(SignatureError) as e:
        signing.verify_file(signed, keys["a"][1], "memory")
    assert str(e.value).startswith(f"{signed}.sig: not a valid edgekv signature (") and "\n" not in str(e.value)


def test_every_single_bit_flip_of_the_signature_file_is_refused(signed, keys):
    """Whatever bit of the .sig changes (except JSON whitespace), verification fails."""
    sig = signed + ".sig"
    original = open(sig, "rb").read()
    rec = json.loads(original)
    for i in range(len(original)):
        data = bytearray(original)
        data[i] ^= 0x01
        open(sig, "wb").write(bytes(data))
        try:
            changed = json.loads(bytes(data)) != rec
        except ValueError:
            changed = True
        if changed:
            with pytest.raises(SignatureError):
                signing.verify_file(signed, keys["a"][1], "memory")


def test_keys_file_mode_and_no_overwrite(tmp_path):
    priv, pub = signing.generate_keypair(tmp_path / "k")
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert open(priv).read().startswith("-----BEGIN PRIVATE KEY-----")
    assert open(pub).read().startswith("-----BEGIN PUBLIC KEY-----")
    before = open(priv, "rb").read()
    with pytest.raises(InputError, match="already exists: refusing to replace a signing key"):
        signing.generate_keypair(tmp_path / "k")
    assert open(priv, "rb").read() == before
    assert not [n for n in os.listdir(tmp_path / "k") if n.startswith(".")]  # no temporary file left


def test_bad_keys(tmp_path, keys, signed):
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(InputError, match="not a PEM or raw 32-byte public key"):
        signing.verify_file(signed, str(tmp_path / "junk.pub"), "memory")
    with pytest.raises(InputError, match="trusted public key not found"):
        signing.verify_file(signed, str(tmp_path / "none.pub"), "memory")
    with pytest.raises(InputError, match="not an unencrypted PEM private key"):
        signing.sign_file(signed, keys["a"][1], "memory")  # the public key where the private one belongs


def test_trust_from_the_environment(monkeypatch, keys):
    monkeypatch.delenv("EDGEKV_TRUST", raising=False)
    assert signing.trusted_key(None) is None
    monkeypatch.setenv("EDGEKV_TRUST", keys["b"][1])
    assert signing.key_id(signing.trusted_key(None)) == kid(keys["b"][1])
    assert signing.key_id(signing.trusted_key(keys["a"][1])) == kid(keys["a"][1])  # explicit wins
    monkeypatch.setenv("EDGEKV_TRUST", "")
    assert signing.trusted_key(None) is None


def test_missing_cryptography_is_a_clear_error(monkeypatch, signed, keys):
    import sys

    monkeypatch.setitem(sys.modules, "cryptography", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'edgekv\[sign\]'"):
        signing.verify_file(signed, keys["a"][1], "memory")


def test_sign_memory_checks_the_generation_it_signs(tmp_path, keys, exported):
    mem = memory_for(exported("llama"), str(tmp_path / "m.ekv"), n=2)
    with Memory(mem) as m:
        gen = m.generation
    with pytest.raises(MismatchError, match="changed by another writer"):
        signing.sign_memory(mem, keys["a"][0], expect_generation=gen - 1)
    assert not os.path.exists(mem + ".sig")
    signing.sign_memory(mem, keys["a"][0], expect_generation=gen)
    assert json.load(open(mem + ".sig"))["claims"] == {"generation": gen}
    with Memory(mem) as m:
        assert signing.verify_memory(m, keys["a"][1]) == kid(keys["a"][1])


# --- the CLI ------------------------------------------------------------------------------------------
def test_keys_generate_cli(tmp_path):
    out = str(tmp_path / "k")
    res = runner.invoke(app, ["keys", "generate", "--out", out, "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["private_key"] == os.path.join(out, "edgekv-signing.key") and len(data["key_id"]) == 16
    assert stat.S_IMODE(os.stat(data["private_key"]).st_mode) == 0o600
    res = runner.invoke(app, ["keys", "generate", "--out", out])
    assert res.exit_code == 3 and res.stdout == "" and res.stderr.count("\n") == 1
    assert "already exists: refusing to replace a signing key" in res.stderr


def test_keys_sign_cli_memory_and_export(tmp_path, keys, exported):
    art = str(tmp_path / "art")
    shutil.copytree(exported("llama"), art)
    mem = memory_for(art, str(tmp_path / "m.ekv"), n=2)
    for path in (mem, art):
        res = runner.invoke(app, ["keys", "sign", path, "--key", keys["b"][0], "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["key_id"] == kid(keys["b"][1])
    assert signing.verify_file(mem, keys["b"][1], "memory") == kid(keys["b"][1])
    assert signing.verify_export(art, keys["b"][1]) == kid(keys["b"][1])
    res = runner.invoke(app, ["keys", "sign", str(tmp_path / "none.ekv"), "--key", keys["b"][0]])
    assert res.exit_code == 3 and "memory file not found" in res.stderr, res.output


@pytest.fixture(scope="module")
def signed_export(tiny_model_dir, keys, tmp_path_factory):
    """The tiny llama exported with ``edgekv export --sign`` (key a) and a signed memory for it."""
    base = tmp_path_factory.mktemp("signed-export")
    art = str(base / "art")
    res = runner.invoke(app, ["export", "--model", tiny_model_dir("llama"), "--out", art, "--sign", keys["a"][0], "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["signed_by"] == kid(keys["a"][1])
    mem = memory_for(art, str(base / "m.ekv"), n=4)
    signing.sign_memory(mem, keys["a"][0])
    return art, mem


def run(art, memory, *extra, env=None):
    args = ["run", art, "--prompt", "code for river?", "-n", "2", "-k", "1", "--json", *extra]
    return runner.invoke(app, args + (["--memory", memory] if memory else []), env=env)


def assert_refused(res, phrase):
    assert res.exit_code == 8, res.output
    assert res.stdout == "" and res.stderr.startswith("edgekv: error: ") and res.stderr.count("\n") == 1
    assert phrase in res.stderr, res.stderr


def test_run_with_trust_accepts_what_the_key_signed(signed_export, keys):
    art, mem = signed_export
    assert os.path.isfile(os.path.join(art, "manifest.json.sig"))
    res = run(art, mem, "--trust", keys["a"][1])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["trusted_key_id"] == kid(keys["a"][1])
    res = run(art, mem, env={"EDGEKV_TRUST": keys["a"][1]})
    assert res.exit_code == 0, res.output
    assert run(art, None, "--trust", keys["a"][1]).exit_code == 0  # no memory: the export alone


def test_run_with_trust_refuses_another_key(signed_export, keys):
    art, mem = signed_export
    assert_refused(run(art, mem, "--trust", keys["b"][1]), f"not by the trusted key {kid(keys['b'][1])}")
    assert_refused(run(art, mem, env={"EDGEKV_TRUST": keys["b"][1]}), "manifest.json: signed by key")


def test_unsigned_memory_refused_under_trust_accepted_without(signed_export, keys, tmp_path):
    art, _ = signed_export
    mem = memory_for(art, str(tmp_path / "u.ekv"), n=4)
    assert_refused(run(art, mem, "--trust", keys["a"][1]), f"{mem}: not signed (u.ekv.sig is missing)")
    assert_refused(run(art, mem, env={"EDGEKV_TRUST": keys["a"][1]}), "u.ekv.sig is missing")
    assert run(art, mem).exit_code == 0


def test_changed_memory_or_stale_signature_refused(signed_export, keys, tmp_path):
    art, signed_mem = signed_export
    mem = str(tmp_path / "m.ekv")
    shutil.copy(signed_mem, mem)
    shutil.copy(signed_mem + ".sig", mem + ".sig")
    assert run(art, mem, "--trust", keys["a"][1]).exit_code == 0
    flip(mem, os.path.getsize(mem) - 3)  # a flipped bit in an (empty) slot: no checksum sees it, the signature does
    assert_refused(run(art, mem, "--trust", keys["a"][1]), "its contents differ from what was signed")
    shutil.copy(signed_mem, mem)
    commit_update(mem, clear=[0])  # a new state committed after signing: the signature is stale
    assert_refused(run(art, mem, "--trust", keys["a"][1]), "its contents differ from what was signed")


def test_unsigned_or_tampered_export_refused(signed_export, keys, tmp_path, exported):
    art, mem = signed_export
    copy = str(tmp_path / "art")
    shutil.copytree(art, copy)
    os.remove(os.path.join(copy, "manifest.json.sig"))
    assert_refused(run(copy, mem, "--trust", keys["a"][1]), "manifest.json: not signed (manifest.json.sig is missing)")
    assert run(copy, mem).exit_code == 0
    shutil.copy(os.path.join(art, "manifest.json.sig"), os.path.join(copy, "manifest.json.sig"))
    flip(os.path.join(copy, "manifest.json"), 100)
    assert_refused(run(copy, mem, "--trust", keys["a"][1]), "manifest.json: its contents differ from what was signed")
    manifest = json.load(open(os.path.join(art, "manifest.json")))
    manifest["tokenizer"]["chat_template"] = "{{ messages[0]['content'] }}"
    open(os.path.join(copy, "manifest.json"), "w").write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    assert_refused(run(copy, mem, "--trust", keys["a"][1]), "bytes were signed (the file is truncated or was replaced)")


def test_artifact_changed_under_a_signed_manifest_is_refused(signed_export, keys, tmp_path):
    art, mem = signed_export
    copy = str(tmp_path / "art")
    shutil.copytree(art, copy)
    with open(os.path.join(copy, "tokenizer.json"), "a") as f:
        f.write(" ")
    res = run(copy, mem, "--trust", keys["a"][1], "--no-chat")
    assert res.exit_code == 5 and "tokenizer.json does not match manifest.json" in res.stderr, res.output


def test_runtime_load_trust(signed_export, keys, monkeypatch):
    from edgekv.runtime import Runtime

    art, mem = signed_export
    with Runtime.load(art, memory=mem, k=1, trust=keys["a"][1]) as rt:
        assert rt.trusted_key_id == kid(keys["a"][1])
        assert rt.generate("code for river?", max_new_tokens=1).token_ids
    with pytest.raises(SignatureError, match="not by the trusted key"):
        Runtime.load(art, memory=mem, k=1, trust=open(keys["b"][1], "rb").read())
    monkeypatch.setenv("EDGEKV_TRUST", keys["b"][1])  # the library honours the variable too
    with pytest.raises(SignatureError, match="not by the trusted key"):
        Runtime.load(art, memory=mem, k=1)
    monkeypatch.delenv("EDGEKV_TRUST")
    with Runtime.load(art, memory=mem, k=1) as rt:
        assert rt.trusted_key_id is None


def test_adapt_sign(tiny_model_dir, keys, tmp_path):
    data = tmp_path / "task-a.jsonl"
    data.write_text("".join(json.dumps({"id": i, "prompt": f"code for item {i}?", "answer": f"K{i}"}) + "\n"
                            for i in range(4)))
    mem = str(tmp_path / "m.ekv")
    res = runner.invoke(app, ["adapt", "--model", tiny_model_dir("llama"), "--data", str(data), "--memory", mem,
                              "--budget", "40KB", "--pooled-len", "4", "--steps", "2", "-k", "2", "--no-progress",
                              "--sign", keys["a"][0], "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["signature"] == {"path": mem + ".sig", "key_id": kid(keys["a"][1])}
    assert signing.verify_file(mem, keys["a"][1], "memory") == kid(keys["a"][1])
    assert json.load(open(mem + ".sig"))["claims"] == {"generation": out["generation"]}
    # a bad key is refused before anything runs
    res = runner.invoke(app, ["adapt", "--model", tiny_model_dir("llama"), "--data", str(data), "--memory",
                              str(tmp_path / "n.ekv"), "--budget", "40KB", "--sign", keys["a"][1]])
    assert res.exit_code == 3 and "not an unencrypted PEM private key" in res.stderr, res.output
    assert not os.path.exists(tmp_path / "n.ekv")


# --- updates: edgekv memory diff --sign / apply --trust --------------------------------------------
@pytest.fixture()
def states(tmp_path):
    """(old, new): two states of one small synthetic memory, new two commits later."""
    import numpy as np

    from edgekv.format import Entry, MemorySpec, create_memory

    rng = np.random.default_rng(0)
    spec = MemorySpec(2, 2, 8, 4, 16, "e1" * 32)
    old, new = str(tmp_path / "old.ekv"), str(tmp_path / "new.ekv")
    create_memory(old, spec, 40_000).close()

    def entry():
        return Entry.from_float(rng.normal(size=16), rng.normal(size=spec.payload_shape),
                                rng.normal(size=spec.payload_shape), task="t")

    commit_update(old, put={0: entry(), 1: entry()})
    shutil.copy(old, new)
    commit_update(new, put={1: entry(), 2: entry()})
    commit_update(new, clear=[0])
    return old, new


def device_copy(old: str, tmp_path) -> str:
    dev = str(tmp_path / "device.ekv")
    shutil.copy(old, dev)
    return dev


def memory_cli(*args, env=None):
    return runner.invoke(app, ["memory", *args], env=env)


def test_signed_update_applies_under_trust_and_the_result_verifies(states, keys, tmp_path):
    old, new = states
    upd = str(tmp_path / "u.ekvu")
    res = memory_cli("diff", old, new, "-o", upd, "--sign", keys["a"][0], "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["signature"]["key_id"] == kid(keys["a"][1])
    rec = json.load(open(upd + ".sig"))
    assert rec["purpose"] == "edgekv-update-v1" and rec["result"]["purpose"] == "edgekv-memory-v1"
    assert rec["claims"]["new_sha256"] == signing.file_digest(new)[0] == rec["result"]["sha256"]
    dev = device_copy(old, tmp_path)
    res = memory_cli("apply", dev, upd, "--trust", keys["a"][1], "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["signature"] == {"path": dev + ".sig", "key_id": kid(keys["a"][1])}
    assert open(dev, "rb").read() == open(new, "rb").read()
    assert signing.verify_file(dev, keys["a"][1], "memory") == kid(keys["a"][1])
    # the same update again is a no-op, and the memory stays signed
    assert memory_cli("apply", dev, upd, "--trust", keys["a"][1]).exit_code == 0
    assert signing.verify_file(dev, keys["a"][1], "memory")


def test_unsigned_or_foreign_update_refused_under_trust_nothing_written(states, keys, tmp_path):
    old, new = states
    upd = str(tmp_path / "u.ekvu")
    assert memory_cli("diff", old, new, "-o", upd).exit_code == 0
    dev = device_copy(old, tmp_path)
    before = open(dev, "rb").read()
    res = memory_cli("apply", dev, upd, "--trust", keys["a"][1])
    assert_refused(res, f"{upd}: not signed (u.ekvu.sig is missing)")
    assert_refused(memory_cli("apply", dev, upd, env={"EDGEKV_TRUST": keys["a"][1]}), "u.ekvu.sig is missing")
    signing.sign_update(upd, new, keys["b"][0])
    assert_refused(memory_cli("apply", dev, upd, "--trust", keys["a"][1]),
                   f"{upd}: signed by key {kid(keys['b'][1])}, not by the trusted key {kid(keys['a'][1])}")
    assert open(dev, "rb").read() == before and not os.path.exists(dev + ".sig")
    res = memory_cli("apply", dev, upd)  # without trust: applied
    assert res.exit_code == 0, res.output
    assert open(dev, "rb").read() == open(new, "rb").read()


def test_tampered_update_or_a_memory_signature_as_update_refused(states, keys, tmp_path):
    old, new = states
    upd = str(tmp_path / "u.ekvu")
    assert memory_cli("diff", old, new, "-o", upd, "--sign", keys["a"][0]).exit_code == 0
    dev = device_copy(old, tmp_path)
    before = open(dev, "rb").read()
    flip(upd, os.path.getsize(upd) - 5)
    assert_refused(memory_cli("apply", dev, upd, "--trust", keys["a"][1]), "its contents differ from what was signed")
    # a signed memory presented as an update (file and signature both swapped)
    signing.sign_memory(new, keys["a"][0])
    shutil.copy(new, upd)
    shutil.copy(new + ".sig", upd + ".sig")
    assert_refused(memory_cli("apply", dev, upd, "--trust", keys["a"][1]),
                   "its signature is for a memory (edgekv-memory-v1), not for an update (edgekv-update-v1)")
    assert open(dev, "rb").read() == before


def test_update_without_the_result_signature_refused(states, keys, tmp_path):
    old, new = states
    upd = str(tmp_path / "u.ekvu")
    assert memory_cli("diff", old, new, "-o", upd).exit_code == 0
    signing.sign_file(upd, keys["a"][0], "update")  # signed, but carries no signature of its result
    dev = device_copy(old, tmp_path)
    assert_refused(memory_cli("apply", dev, upd, "--trust", keys["a"][1]), "no valid signature of the memory it produces")


def test_sign_update_refuses_a_memory_that_is_not_its_result(states, keys, tmp_path):
    old, new = states
    upd = str(tmp_path / "u.ekvu")
    assert memory_cli("diff", old, new, "-o", upd).exit_code == 0
    with pytest.raises(MismatchError, match="is not the memory .* produces"):
        signing.sign_update(upd, old, keys["a"][0])


def test_crash_between_apply_and_signature_is_refused_then_recovered(states, keys, tmp_path):
    """The memory renamed, its .sig not yet written: a trusting run refuses the stale signature;
    applying the same update again (a no-op) writes it."""
    old, new = states
    upd = str(tmp_path / "u.ekvu")
    assert memory_cli("diff", old, new, "-o", upd, "--sign", keys["a"][0]).exit_code == 0
    dev = device_copy(old, tmp_path)
    signing.sign_memory(dev, keys["a"][0])  # the base was signed
    assert memory_cli("apply", dev, upd).exit_code == 0  # as if killed before the .sig: the old one stays
    with pytest.raises(SignatureError, match="its contents differ from what was signed"):
        signing.verify_file(dev, keys["a"][1], "memory")
    res = memory_cli("apply", dev, upd, "--trust", keys["a"][1], "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["applied"] is False, res.output
    assert signing.verify_file(dev, keys["a"][1], "memory") == kid(keys["a"][1])


def test_an_older_update_is_refused_after_a_newer_one(states, keys, tmp_path):
    old, new = states
    newer = str(tmp_path / "newer.ekv")
    shutil.copy(new, newer)
    commit_update(newer, clear=[1])
    u1, u2 = str(tmp_path / "u1.ekvu"), str(tmp_path / "u2.ekvu")
    assert memory_cli("diff", old, new, "-o", u1, "--sign", keys["a"][0]).exit_code == 0
    assert memory_cli("diff", new, newer, "-o", u2, "--sign", keys["a"][0]).exit_code == 0
    dev = device_copy(old, tmp_path)
    for u in (u1, u2):
        assert memory_cli("apply", dev, u, "--trust", keys["a"][1]).exit_code == 0
    res = memory_cli("apply", dev, u1, "--trust", keys["a"][1])  # replayed: validly signed, but for an older base
    assert res.exit_code == 5 and "newer than the update's base" in res.stderr, res.output
    assert signing.verify_file(dev, keys["a"][1], "memory") and open(dev, "rb").read() == open(newer, "rb").read()
