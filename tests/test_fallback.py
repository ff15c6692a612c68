"""A decoder family edgekv's fused graph does not cover: ``edgekv export`` falls back to optimum's
graph (fp32) with one line for the user, adapt builds its memory through the same generic host
path, and the runtime equals transformers with and without memory. Families the memory cannot
hold (another RoPE per layer, layers without RoPE, no RoPE) and exports nothing can write are
refused in one line.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from reference import greedy, prefix_kv
from tiny_models import FALLBACK_FAMILIES, save_random_model, train_tokenizer

from edgekv.errors import InputError
from edgekv.manifest import read_manifest
from edgekv.rope import remove_rope

NOTE = "{} is not covered by edgekv's fused graph; exporting optimum's graph (fp32) instead"
PROMPT = "what is the code for river?"
EXAMPLES = [("code for apple?", "K7"), ("code for river?", "Q2"), ("code for stone?", "Z9"),
            ("what colour is the triangle?", "green"), ("how many dots are there?", "three dots"),
            ("hello world", "this is a tiny tokenizer")]


@pytest.fixture(scope="module", params=FALLBACK_FAMILIES)
def fallback(request, tiny_model_dir, backbone, tmp_path_factory):
    """(family, backbone, export folder, export summary, what the export said on stderr)."""
    import contextlib
    import io

    from edgekv.export.pipeline import export_model

    family = request.param
    folder = tiny_model_dir(family)
    out = str(tmp_path_factory.mktemp(f"fallback-{family}") / "art")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        summary = export_model(folder, out, progress=False)
    return family, backbone(folder), out, summary, err.getvalue()


def test_export_falls_back_to_optimum_with_one_line(fallback):
    import onnx

    family, bb, art, summary, err = fallback
    assert err.strip().splitlines() == [f"edgekv: {NOTE.format(family)}"]
    assert summary["note"] == NOTE.format(family)
    assert summary["decoder"]["graph"] == "optimum" and summary["decoder"]["weights"] == "fp32"
    assert summary["decoder"]["fp32_check"]["max_abs_diff_with_past"] <= 1e-4
    m = read_manifest(art)
    assert m["model_type"] == family and m["model_fingerprint"] == bb.fingerprint
    assert "row_tables" not in m["decoder"]  # optimum's graph: no fused weight file
    ops = {n.op_type for n in onnx.load(os.path.join(art, "model.onnx"), load_external_data=False).graph.node}
    assert "GroupQueryAttention" not in ops


def test_runtime_greedy_equals_transformers_with_and_without_injected_memory(fallback):
    from edgekv.runtime import Runtime

    family, bb, art, _, _ = fallback
    eos = set(bb.eos_token_ids)
    prefix = list(bb.tokenizer.apply_chat_template(
        [{"role": "user", "content": "code for river?"}, {"role": "assistant", "content": "Q2"}], tokenize=True))
    K, V = prefix_kv(bb.model, prefix)
    free = remove_rope(K, bb.rope, np.arange(len(prefix)))  # the memory's position-free form
    with Runtime.load(art, k=0) as rt:
        query = rt.prompt_ids(PROMPT)
        plain = rt.generate(PROMPT, max_new_tokens=12)
        injected = rt.generate(PROMPT, max_new_tokens=12, inject=(free, V))
        moved = np.abs(rt.logits(query, *rt.rotate(free, V)) - rt.logits(query)).max()
    assert plain.token_ids == greedy(bb.model, query, 12, eos) and plain.token_ids
    assert injected.token_ids == greedy(bb.model, prefix + query, 12, eos)
    assert injected.num_memory_tokens == len(prefix)
    assert moved > 1e-2  # control: the injected memory changes the logits


def test_adapted_memory_runs_as_in_pytorch(fallback, tmp_path):
    """adapt (the generic host path) writes a memory; the runtime retrieves it and its logits and
    greedy text equal transformers' with the same memory as past."""
    from edgekv.data import Example
    from edgekv.host.keymodel import KeyModel
    from edgekv.induce.adapt import AdaptConfig, adapt, effective, memory_spec, read_bank
    from edgekv.induce.calibrate import CalibrationConfig
    from edgekv.induce.entries import EntryConfig, key_ids, query_ids, raw_keys
    from edgekv.induce.select import SelectionConfig
    from edgekv.induce.torch_induction import Induction, greedy_decode, make_cache
    from edgekv.runtime import Runtime

    family, bb, art, _, _ = fallback
    cfg = AdaptConfig(entry=EntryConfig(pooled_len=4), selection=SelectionConfig(steps=3, batch_size=4),
                      calibration=CalibrationConfig(steps=2, batch_size=4), top_k=2, anchors_per_task=3,
                      eval_queries=6)
    mem = str(tmp_path / "m.ekv")
    adapt(bb, [Example(f"t-{i}", p, a) for i, (p, a) in enumerate(EXAMPLES)], mem,
          memory_spec(bb, cfg).file_bytes_for(4), "t", cfg)
    from edgekv.format import Memory

    with Memory(mem) as m:
        bank, slots = read_bank(m)
        proj, cal = m.projection, m.calibration
        key_layer = m.spec.key_layer
    ind = Induction(bb.model, bank, effective(bank.raw_keys, proj), cfg.top_k, bb.rope)
    q = effective(raw_keys(KeyModel(bb.decoder, key_layer), [key_ids(bb.tokenizer, PROMPT)]), proj)
    idx, _, k_mem, v_mem = ind.memory_for(q, None, torch.zeros(len(bank)), torch.tensor(cal.tau),
                                          torch.tensor(cal.gates), leave_one_out=False)
    ids = query_ids(bb.tokenizer, PROMPT)
    T, L = k_mem.shape[3], bb.shape.num_layers
    with torch.no_grad():
        want = bb.model(input_ids=torch.tensor([ids]), past_key_values=make_cache(k_mem, v_mem, L),
                        position_ids=torch.arange(T, T + len(ids))[None]).logits[0].numpy()
    text = greedy_decode(bb.model, {"input_ids": torch.tensor([ids])}, torch.arange(T, T + len(ids))[None],
                         make_cache(k_mem, v_mem, L), 12, set(bb.eos_token_ids))
    with Runtime.load(art, memory=mem) as rt:
        got_ret = rt.retrieve(PROMPT)
        assert [r.slot for r in got_ret] == [slots[i] for i in idx[0].tolist()]
        got = rt.logits(ids, *rt.memory_kv(got_ret))
        res = rt.generate(PROMPT, max_new_tokens=12)
    assert np.abs(got - want).max() <= 1e-4
    assert res.token_ids == text and res.num_memory_tokens == T


def test_quantised_weights_need_the_fused_graph(fallback, tmp_path):
    from edgekv.export.pipeline import export_model

    family, bb, _, _, _ = fallback
    with pytest.raises(InputError, match=f"quantize_weights needs edgekv's fused graph, which does not cover {family}"):
        export_model(bb.source, str(tmp_path / "q"), quantize_weights="int8", progress=False)
    assert not os.path.exists(tmp_path / "q")


def _tiny_folder(path, config_class, **fields) -> str:
    """A tiny random ``config_class`` model with the tests' tokenizer, saved to ``path``."""
    from transformers import AutoModelForCausalLM

    tok = train_tokenizer()
    config = config_class(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                          bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False, **fields)
    torch.manual_seed(0)
    return save_random_model(AutoModelForCausalLM.from_config(config), tok, str(path))


def test_families_the_memory_cannot_hold_are_refused(tmp_path):
    """gemma3's sliding layers rotate with another RoPE base than its global ones, smollm3 leaves
    RoPE out of some layers: one RoPE spec cannot make their keys position-free (the round trip)."""
    from transformers import Gemma3TextConfig, SmolLM3Config

    from edgekv.host.models import load_backbone

    for name, config_class, fields in (("gemma3_text", Gemma3TextConfig, {"sliding_window": 256}),
                                       ("smollm3", SmolLM3Config, {"no_rope_layer_interval": 2})):
        folder = _tiny_folder(tmp_path / name, config_class, **fields)
        with pytest.raises(InputError, match=rf"architecture '{name}' is not supported \(its layers' cached keys "
                                             r"are not all one RoPE at their positions"):
            load_backbone(folder)


def test_cli_refuses_what_neither_graph_can_export(tmp_path):
    """A family optimum cannot export either is refused from its config alone, in one line."""
    from transformers import Starcoder2Config
    from typer.testing import CliRunner

    from edgekv.cli import app

    folder = tmp_path / "starcoder2"
    Starcoder2Config(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=100).save_pretrained(folder)
    res = CliRunner().invoke(app, ["export", "--model", str(folder), "--out", str(tmp_path / "art")])
    assert res.exit_code == 3 and "starcoder2 is covered neither by edgekv's fused graph" in res.stderr
    assert "Traceback" not in res.output and len(res.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "art")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "starcoder2"
