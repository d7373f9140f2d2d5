"""A new user's first hour (issue 26, items 8-12): commands that need no LLM answer without importing torch,
`ragkv bench -h` works, the examples keep out of the user's corpus, what can be checked before the model
loads is checked and answered in one line, `cachecraft` is documented, the package builds without a
setuptools warning, and ingestion draws one progress bar, none into a log."""

from __future__ import annotations

import ast
import io
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
