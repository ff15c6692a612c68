"""``edgekv keys generate|sign``: the Ed25519 key pair that signs memories, updates and exports."""

from __future__ import annotations

import os

import typer

from edgekv.cli import app, emit, guarded, table

keys_app = typer.Typer(help="Signing keys: make the pair whose public half boards trust (--trust).",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
@guarded
def generate_cmd(
    out: str = typer.Option(..., "--out", "-o", help="Folder for edgekv-signing.key (private, mode 0600) and "
                                                     "edgekv-signing.pub (public); an existing key is never replaced."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Make a new key pair: keep the .key on the host (--sign), give boards the .pub (--trust)."""
    from edgekv.signing import generate_keypair, key_id, load_public_key

    private, public = generate_keypair(out)
    data = {"private_key": private, "public_key": public, "key_id": key_id(load_public_key(public))}
    emit(data, json_out, lambda d: table([("private key", f"{d['private_key']}  (keep it on the host: --sign)"),
                                          ("public key", f"{d['public_key']}  (for boards: --trust / EDGEKV_TRUST)"),
                                          ("key id", d["key_id"])]))


@keys_app.command("sign")
@guarded
def sign_cmd(
    path: str = typer.Argument(..., help="A memory file (.ekv) or an export folder (signs its manifest.json)."),
    key: str = typer.Option(..., "--key", help="Private key file (.key of `edgekv keys generate`)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Sign an existing memory or export (again after a killed `adapt --sign`, or with a new key)."""
    from edgekv.signing import key_id, load_private_key, sign_export, sign_memory

    signer = load_private_key(key)
    sig = sign_export(path, signer) if os.path.isdir(path) else sign_memory(path, signer)
    emit({"signature": sig, "key_id": key_id(signer.public_key())}, json_out,
         lambda d: table([("signature", d["signature"]), ("key id", d["key_id"])]))
