"""Dependencies a board may lack, simulated missing (``sys.modules[name] = None``):

* hnswlib: the runtime searches exactly (the same entries HNSW finds) with one warning line
  that says how to get the index, instead of crashing; building an index says what to install;
* Pillow: text-only use never imports it; an image for a vision-language artifact fails with
  one line naming the extra; so do the built-in image tasks of ``edgekv stream write``.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from test_mismatch import memory_for
from typer.testing import CliRunner

from edgekv import index
from edgekv.cli import app
from edgekv.errors import MissingDependencyError

PROMPTS = ["code for river?", "what colour is the triangle?", "how many dots are there?"]


@pytest.fixture(scope="module")
def art_mem(exported, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("optional")
    art = str(tmp / "art")
    shutil.copytree(exported("llama"), art)
    return art, memory_for(art, str(tmp / "m.ekv"), n=12, top_k=3)


def without(monkeypatch, module: str) -> None:
    """``import module`` fails from here on, as on a board without it (and hnswlib is probed anew)."""
    monkeypatch.setitem(sys.modules, module, None)
    index.hnswlib_status.cache_clear()
    index.warn_exact_instead_of_hnsw.cache_clear()


@pytest.fixture(autouse=True)
def fresh_probe():
    yield
    index.hnswlib_status.cache_clear()
    index.warn_exact_instead_of_hnsw.cache_clear()


def answers(rt) -> list[tuple]:
    """(retrieved slots, texts, alphas) of PROMPTS."""
    res = [rt.generate(p, 6) for p in PROMPTS]
    return [[r.slot for r in x.retrieved] for x in res], [x.text for x in res], \
        np.array([[r.alpha for r in x.retrieved] for x in res])


def same_answers(got: tuple, want: tuple) -> bool:
    """Same entries and texts; alphas to float32 rounding (HNSW's sims are the chosen rows' dot products)."""
    return got[:2] == want[:2] and np.allclose(got[2], want[2], atol=1e-5)


# --- hnswlib --------------------------------------------------------------------------------
def test_runtime_without_hnswlib_searches_exactly_with_one_warning(art_mem, monkeypatch, capsys):
    from edgekv.runtime import Runtime

    art, mem = art_mem
    with Runtime.load(art, memory=mem, retrieval="hnsw") as rt:
        assert rt.retriever.mode == "hnsw"
        want = answers(rt)
    assert capsys.readouterr().err == ""
    without(monkeypatch, "hnswlib")
    for _ in range(2):
        with Runtime.load(art, memory=mem, retrieval="hnsw") as rt:
            assert rt.retriever.mode == "exact" and "hnswlib is not installed" in rt.retriever.reason
            assert same_answers(answers(rt), want)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("edgekv: warning: hnswlib is not installed: exact search"), err
    assert "pip install hnswlib" in err
    # the CLI too: the answer, exact search, the same one warning line (once per process)
    index.warn_exact_instead_of_hnsw.cache_clear()
    res = CliRunner().invoke(app, ["run", art, "--memory", mem, "--retrieval", "hnsw", "-p", PROMPTS[0], "-n", "6",
                                   "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["retrieval_mode"] == "exact" and data["text"] == want[1][0]
    assert res.stderr.count("\n") == 1 and "pip install hnswlib" in res.stderr


def test_automatic_retrieval_without_hnswlib_finds_what_hnsw_finds(art_mem, monkeypatch, capsys):
    """A memory large enough for HNSW (exact_below lowered here) falls back to exact search."""
    from edgekv.format import Memory

    _, mem = art_mem
    config = index.IndexConfig(exact_below=4)
    rng = np.random.default_rng(0)
    with Memory(mem) as m:
        ann = index.Retriever(m, config=config)
        assert ann.mode == "hnsw"
        queries = [q / np.linalg.norm(q) for q in rng.normal(size=(8, ann.keys.shape[1])).astype(np.float32)]
        want = [[x.tolist() for x in ann.search(q, 3)] for q in queries]
        without(monkeypatch, "hnswlib")
        exact = index.Retriever(m, config=config)
        assert exact.mode == "exact" and exact.reason == "hnswlib is not installed"
        got = [[x.tolist() for x in exact.search(q, 3)] for q in queries]
    assert [g[0] for g in got] == [w[0] for w in want]
    np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], rtol=1e-6, atol=1e-6)  # cosines in [-1, 1]: float32 sums in another order
    assert capsys.readouterr().err.count("edgekv: warning: hnswlib is not installed") == 1


def test_building_an_index_without_hnswlib_says_what_to_install(art_mem, monkeypatch, tmp_path):
    without(monkeypatch, "hnswlib")
    with pytest.raises(MissingDependencyError, match=r"^the HNSW index needs hnswlib: pip install hnswlib$"):
        index.build_index(art_mem[1], str(tmp_path))


# --- Pillow ---------------------------------------------------------------------------------
def test_text_only_use_without_pillow(art_mem, monkeypatch):
    from edgekv.runtime import Runtime

    art, mem = art_mem
    with Runtime.load(art, memory=mem) as rt:
        want = answers(rt)
    without(monkeypatch, "PIL")
    with Runtime.load(art, memory=mem) as rt:
        assert same_answers(answers(rt), want)
    res = CliRunner().invoke(app, ["run", art, "--memory", mem, "-p", PROMPTS[0], "-n", "6"])
    assert res.exit_code == 0, res.output


def test_an_image_without_pillow_names_the_extra(monkeypatch, tmp_path):
    from edgekv.runtime.vision import ImageProcessorConfig, preprocess

    path = tmp_path / "x.png"
    path.write_bytes(b"\x89PNG")
    cfg = ImageProcessorConfig("clip", 3, (0.5,) * 3, (0.5,) * 3, shortest_edge=8, crop_size=(8, 8))
    without(monkeypatch, "PIL")
    with pytest.raises(MissingDependencyError) as e:
        preprocess(str(path), cfg)
    assert str(e.value) == "an image needs Pillow: pip install 'edgekv[vision]'" and e.value.exit_code == 7


def test_stream_write_of_image_tasks_without_pillow_names_the_extra(monkeypatch, tmp_path):
    without(monkeypatch, "PIL")
    monkeypatch.delitem(sys.modules, "edgekv.data.scenes", raising=False)
    runner = CliRunner()
    res = runner.invoke(app, ["stream", "write", "edge6", "--order", "shape-code", "--out", str(tmp_path / "s"),
                              "--train", "4", "--val", "4", "--test", "4"])
    assert res.exit_code == 7 and "Traceback" not in res.output, res.output
    assert res.stderr == "edgekv: error: the built-in image tasks need Pillow: pip install 'edgekv[vision]'\n"
    # text tasks need no Pillow
    res = runner.invoke(app, ["stream", "write", "facts4", "--out", str(tmp_path / "f"), "--train", "8", "--val", "8",
                              "--test", "8"])
    assert res.exit_code == 0, res.output


def test_a_vision_language_artifact_given_an_image_without_pillow(tmp_path_factory, monkeypatch):
    """Through ``edgekv run --image``: exit 7 and one line naming the extra; text prompts still run."""
    from tiny_vlms import make_tiny_vlm

    from edgekv.export.pipeline import export_model

    tmp = tmp_path_factory.mktemp("vlm-no-pillow")
    art = str(tmp / "artifacts")
    export_model(make_tiny_vlm("llava", str(tmp / "model")), art, progress=False)
    image = tmp / "x.png"
    image.write_bytes(b"\x89PNG not read")
    without(monkeypatch, "PIL")
    runner = CliRunner()
    res = runner.invoke(app, ["run", art, "-p", "what is this?", "--image", str(image), "-n", "2"])
    assert res.exit_code == 7 and res.stdout == "", res.output
    assert res.stderr == "edgekv: error: an image needs Pillow: pip install 'edgekv[vision]'\n"
    res = runner.invoke(app, ["run", art, "-p", "what is this?", "-n", "2"])
    assert res.exit_code == 0, res.output
