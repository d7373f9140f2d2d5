"""Commands that need no LLM do not load it: `--help` imports no torch; `config`, `cache stats` and an
`ingest` of a path that does not exist answer without loading a model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ragkv.cli.main import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_model(monkeypatch):
    """Loading any model fails the test."""
    from ragkv.engine.engine import Engine

    def refuse(*args, **kwargs):
        raise AssertionError("this command must not load a model")

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr("ragkv.models.load_adapter", refuse)
    monkeypatch.setattr("ragkv.engine.engine.load_adapter", refuse)


def test_help_imports_no_torch(tmp_path):
    (tmp_path / "ragkv").symlink_to(ROOT)  # import this checkout
    code = (
        "import sys\nfrom ragkv.cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "for c in ('ingest', 'retrieve', 'query', 'serve', 'cache', 'demo', 'config', 'eval', 'bench'):\n"
        "    try:\n        main([c, '--help'])\n    except SystemExit:\n        pass\n"
        "heavy = ('torch', 'transformers', 'faiss', 'pydantic_settings')\n"
        "print('heavy:', sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "usage: ragkv" in out.stdout and out.stdout.strip().endswith("heavy: []")


def test_config_and_cache_stats_load_no_model(no_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAGKV_DATA_DIR", str(tmp_path))
    assert main(["config"]) == 0
    assert f'data_dir = "{tmp_path}"' in capsys.readouterr().out
    assert main(["cache", "stats", "--json"]) == 0
    assert '"tiers"' in capsys.readouterr().out


def test_ingest_of_a_missing_path_fails_before_loading(no_model, tmp_path, capsys):
    assert main(["ingest", str(tmp_path / "nope.txt"), "--data-dir", str(tmp_path)]) == 2
    assert f"no such file or folder: {tmp_path / 'nope.txt'}" in capsys.readouterr().err


class _EmptyCorpusEngine:
    """An Engine stand-in whose corpus is empty (retrieve finds nothing)."""

    def __init__(self, config) -> None:
        self.config = config

    def retrieve(self, question, k, namespace=None):
        return []

    def close(self) -> None:
        pass


def test_retrieve_warns_about_an_empty_corpus(monkeypatch, tmp_path, capsys):
    from ragkv.engine.engine import Engine

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(lambda cls, config=None: _EmptyCorpusEngine(config)))
    assert main(["retrieve", "where?", "--data-dir", str(tmp_path), "--json"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "[]"  # the JSON stays parseable; the warning goes to stderr
    assert f"warning: no chunks retrieved: the corpus in {tmp_path} (namespace default) is empty" in out.err


def test_doc_that_looks_like_a_file_gets_a_hint(monkeypatch, tmp_path, capsys):
    from ragkv.cli.query import looks_like_a_path
    from ragkv.engine.engine import Engine

    f = tmp_path / "notes.txt"
    f.write_text("The Rhine bends north at Basel.")
    assert looks_like_a_path(str(f)) and looks_like_a_path("missing/file.md")
    assert not looks_like_a_path("The Rhine bends north at Basel.")

    def stop(cls, config=None):
        raise FileNotFoundError("stop here: the hint came before the model")

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(stop))
    assert main(["query", "where?", "--doc", str(f)]) == 2
    assert f"warning: --doc takes a document's text; '{f}' looks like a file: use --file {f}" in capsys.readouterr().err


def test_calibrate_refuses_fractional_bits_on_grids_that_are_not_per_channel(no_model, capsys):
    code = main(["calibrate", "--quantum", "0.25", "--key-group", "64x1"])
    assert code == 2 and "fractional bits need per-channel grids" in capsys.readouterr().err
