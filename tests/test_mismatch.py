"""Files that must belong together but do not are refused: exit code 5, one line, what to do.

Through ``edgekv run`` (CliRunner): a memory for another model (fingerprint), a memory of
other shapes / key layer / RoPE than the model, an artifact whose sha256 differs from the
manifest (each hashed file). An index built for another memory or for an earlier state of
the same memory (an adapt since the export) is not refused but never used: the runtime builds
the memory's own index beside it. An index the manifest does not list is not used at all.
Library-level versions of the first and the index case live in
tests/test_runtime.py (``test_memory_for_another_model_is_refused``,
``test_index_for_another_memory_is_never_used``); the manifest hash case in
tests/test_export.py (``test_flipped_byte_and_missing_file_are_refused``); export-time
refusal of a foreign memory in tests/test_export.py too. And a ``-k`` other than the k the
memory's tau was calibrated for (the memory records it), and the default k that follows it.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekv.cli import app
from edgekv.format import Entry, MemorySpec, commit_update, create_memory
from edgekv.rope import RopeSpec

runner = CliRunner()


def memory_for(art: str, path: str, n: int = 4, top_k: int | None = None, **change) -> str:
    """A memory matching the artifacts' manifest (fingerprint, shapes, key, RoPE) except ``change``;
    ``top_k``: the k it records (None: none, as a format-version-1 file)."""
    m = json.load(open(os.path.join(art, "manifest.json")))
    rope = RopeSpec(tuple(m["rope"]["inv_freq"]), m["rope"]["attention_scaling"]) if m["rope"] else None
    fields = dict(num_layers=m["num_layers"], num_kv_heads=m["num_kv_heads"], head_dim=m["head_dim"], pooled_len=2,
                  key_dim=m["hidden_size"], model_fingerprint=m["model_fingerprint"], payload_dtype="int8",
                  rope=rope, key_layer=m["key"]["layer"], key_pooling=m["key"]["pooling"])
    fields.update(change)
    spec = MemorySpec(**fields)
    create_memory(path, spec, spec.file_bytes_for(n + 1)).close()
    rng = np.random.default_rng(abs(hash(path)) % 2**32)
    shape = spec.payload_shape
    commit_update(path, {s: Entry.from_float(rng.normal(size=spec.key_dim), rng.normal(size=shape),
                                             rng.normal(size=shape), "int8", "t", f"s{s}") for s in range(n)},
                  top_k=top_k)
    return path


def run(art: str, memory: str | None = None, *extra: str):
    args = ["run", art, "--prompt", "code for river?", "-n", "2", "-k", "1", *extra]
    return runner.invoke(app, args + (["--memory", memory] if memory else []))


def assert_refused(res, code: int, *phrases: str) -> None:
    assert res.exit_code == code, res.output
    assert res.stdout == "" and "Traceback" not in res.output
    assert res.stderr.startswith("edgekv: error: ") and res.stderr.count("\n") == 1, res.stderr
    for p in phrases:
        assert p in res.stderr, res.stderr


@pytest.fixture()
def art(exported, tmp_path) -> str:
    """A private copy of the tiny Llama export (tests edit it)."""
    out = str(tmp_path / "art")
    shutil.copytree(exported("llama"), out)
    return out


def test_matching_memory_runs(art, tmp_path):
    res = run(art, memory_for(art, str(tmp_path / "ok.ekv")), "--json")
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["retrieved"]) == 1


# --- k: the memory records the k its tau is fitted for ---------------------------------
def run_k(art: str, memory: str, *k: str):
    return runner.invoke(app, ["run", art, "--prompt", "code for river?", "-n", "1", "--json", *k, "--memory", memory])


def test_k_defaults_to_the_memory_s_k(art, tmp_path):
    from edgekv.runtime import Runtime

    cases = [(dict(n=4, top_k=3), 3),  # the k it was adapted with
             (dict(n=4, top_k=None), 4),  # none recorded (format version 1): 4, as before
             (dict(n=2, top_k=3), 2)]  # fewer entries than its k: adapt fitted tau for that many
    for i, (kw, want) in enumerate(cases):
        mem = memory_for(art, str(tmp_path / f"m{i}.ekv"), **kw)
        res = run_k(art, mem)
        assert res.exit_code == 0, res.output
        assert len(json.loads(res.stdout)["retrieved"]) == want, kw
        with Runtime.load(art, memory=mem) as rt:
            assert rt.config.k == want
    with Runtime.load(art) as rt:  # no memory: the default as before
        assert rt.config.k == 4


def test_k_other_than_the_memory_s_is_refused(art, tmp_path):
    from edgekv.errors import MismatchError
    from edgekv.runtime import Runtime

    mem = memory_for(art, str(tmp_path / "k3.ekv"), top_k=3)
    for extra in ([], ["--json"]):
        res = runner.invoke(app, ["run", art, "--prompt", "hi", "-n", "1", "-k", "2", "--memory", mem, *extra])
        assert_refused(res, 5, f"RuntimeConfig.k = 2 asked for, but {mem} was calibrated for k = 3: its tau is "
                               "fitted to that many retrieved entries; run with k = 3 (the default), or re-adapt "
                               "the memory with AdaptConfig.top_k = 2 (option -k/--entries)")
    with pytest.raises(MismatchError, match="calibrated for k = 3"):
        Runtime.load(art, memory=mem, k=4)
    for k in (3, 0):  # its own k, and no retrieval at all
        with Runtime.load(art, memory=mem, k=k) as rt:
            assert rt.config.k == k
    few = memory_for(art, str(tmp_path / "few.ekv"), n=2, top_k=3)
    with Runtime.load(art, memory=few, k=2) as rt:  # what adapt fitted with 2 entries
        assert rt.config.k == 2
    with pytest.raises(MismatchError, match=r"calibrated for k = 3 \(k = 2 with its 2 entries\).*run with k = 2"):
        Runtime.load(art, memory=few, k=1)
    any_k = memory_for(art, str(tmp_path / "none.ekv"), top_k=None)  # records no k: any k, as before
    with Runtime.load(art, memory=any_k, k=2) as rt:
        assert rt.config.k == 2


def test_memory_for_another_model(art, tmp_path):
    mem = memory_for(art, str(tmp_path / "other.ekv"), model_fingerprint="ab" * 32)
    for extra in ([], ["--json"]):
        assert_refused(run(art, mem, *extra), 5, "was built for another model (memory fingerprint abababababab, "
                       "the model has", "run with the artifacts of the model it was adapted with, or adapt a new "
                       "memory with this model")


@pytest.mark.parametrize("change, phrase", [
    ({"num_layers": 2, "key_layer": 1},
     "holds KV of shape (layers, heads, head dim) (2, 2, 16), the model has (3, 2, 16) (num_layers 2 vs 3)"),
    ({"num_kv_heads": 1}, "(3, 1, 16), the model has (3, 2, 16) (num_kv_heads 1 vs 2)"),
    ({"head_dim": 8, "rope": RopeSpec((1.0, 0.5, 0.25, 0.125))}, "(3, 2, 8), the model has (3, 2, 16) (head_dim 8 vs 16)"),
])
def test_memory_with_other_shapes(art, tmp_path, change, phrase):
    mem = memory_for(art, str(tmp_path / "shape.ekv"), **change)
    assert_refused(run(art, mem), 5, phrase, "adapt a new memory with this model")


def test_memory_with_another_key_layer_pooling_or_rope(art, tmp_path):
    mem = memory_for(art, str(tmp_path / "key.ekv"), key_layer=2)
    assert_refused(run(art, mem), 5, "the artifacts' key graph (layer 1, mean pooling) differs from the key layer 2 "
                   "(mean pooling) of", "(key_layer differs): re-export with `edgekv export MODEL --memory")
    mem = memory_for(art, str(tmp_path / "pool.ekv"), key_pooling="last")
    assert_refused(run(art, mem), 5, "differs from the key layer 1 (last pooling) of", "(key_pooling differs)")
    mem = memory_for(art, str(tmp_path / "rope.ekv"), rope=None)
    assert_refused(run(art, mem), 5, "RoPE settings differ from the model's (no RoPE in the memory, RoPE over",
                   "adapt a new memory with this model")


@pytest.mark.parametrize("name", ["model.onnx", "key.onnx", "tokenizer.json"])
def test_artifact_whose_hash_differs_from_the_manifest(art, tmp_path, name):
    mem = memory_for(art, str(tmp_path / "m.ekv"))
    path = os.path.join(art, name)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    assert_refused(run(art, mem), 5, f"{name} does not match manifest.json (hash differs): re-export or restore the file")
    os.remove(path)
    assert_refused(run(art, mem), 3, f"{name} is missing from", "re-export the model or restore the file")


def _add_index(art: str, memory: str) -> None:
    """What `edgekv export --memory` adds: index files, their hashes and the index section."""
    from edgekv.index import INDEX_META, build_index
    from edgekv.manifest import file_hashes, read_manifest, write_manifest

    meta = build_index(memory, art)
    data = read_manifest(art, verify_hashes=False)
    data["index"] = meta
    data["files"] = {**data["files"], **file_hashes(art, [meta["file"], INDEX_META])}
    write_manifest(art, data)


def test_index_for_another_memory_or_an_older_state(art, tmp_path):
    """The export's index is a head start for the memory state it was built for, never a
    requirement: another memory or a later state of the same one runs (exact search below
    exact_below entries, --retrieval exact always), and with --retrieval hnsw gets an index
    built on the device beside the memory; the export's stale index is not used."""
    from edgekv.index import build_index, cache_paths

    mem_a = memory_for(art, str(tmp_path / "a.ekv"))
    mem_b = memory_for(art, str(tmp_path / "b.ekv"))
    _add_index(art, mem_a)
    res = run(art, mem_a, "--json", "--retrieval", "hnsw")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["retrieval_mode"] == "hnsw" and out["retrieval_reason"] == "the export's index matches the memory"
    for mode, extra in (("exact", ()), ("exact", ("--retrieval", "exact")), ("hnsw", ("--retrieval", "hnsw"))):
        res = run(art, mem_b, "--json", *extra)
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["retrieval_mode"] == mode
    assert "another memory state (not used)" in json.loads(res.stdout)["retrieval_reason"]
    assert all(os.path.isfile(p) for p in cache_paths(mem_b))  # built on the device, cached beside it
    # the same memory, adapted after the export: the export's index is stale, not trusted, not needed
    commit_update(mem_a, clear=[0])
    for extra in ((), ("--retrieval", "exact"), ("--retrieval", "hnsw")):
        assert run(art, mem_a, "--json", *extra).exit_code == 0
    # an index.hnsw swapped for another one: the manifest's hash refuses it before anything parses it
    build_index(mem_b, str(tmp_path / "idx-b"))
    shutil.copy(os.path.join(tmp_path, "idx-b", "index.hnsw"), os.path.join(art, "index.hnsw"))
    assert_refused(run(art, mem_b), 5, "index.hnsw does not match manifest.json (hash differs)")


def test_index_not_listed_in_the_manifest_is_not_used(art, tmp_path):
    from edgekv.index import build_index

    mem = memory_for(art, str(tmp_path / "m.ekv"))
    other = memory_for(art, str(tmp_path / "other.ekv"))
    build_index(other, art)  # stray index files for another memory, unknown to the manifest
    res = run(art, mem, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["retrieval_mode"] == "exact"
