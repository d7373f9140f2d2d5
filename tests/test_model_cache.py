"""The bundled model is converted once per machine, not once per data directory: a fresh data dir reuses
the shared model cache's conversion; a data dir's own (older) conversion keeps winning; where the cache
cannot be written the conversion goes into the data dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragkv.models import smollm2


@pytest.fixture
def conversions(tmp_path, monkeypatch):
    """Conversions counted, not run: each writes a marker checkpoint into the folder it is given."""
    made: list[Path] = []

    def fake_write(gguf, folder):
        (folder / "model.safetensors").write_bytes(b"converted")
        made.append(folder)

    monkeypatch.setattr(smollm2, "_write_conversion", fake_write)
    monkeypatch.setattr(smollm2, "gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setenv("RAGKV_MODEL_CACHE", str(tmp_path / "cache"))
    return made


def test_the_first_conversion_goes_to_the_shared_cache_and_fresh_data_dirs_reuse_it(tmp_path, conversions):
    first = smollm2.ensure_converted(tmp_path / "data-a")
    second = smollm2.ensure_converted(tmp_path / "data-b")
    assert first == second == tmp_path / "cache" / "smollm2-135m-instruct"
    assert len(conversions) == 1 and (first / "model.safetensors").read_bytes() == b"converted"
    assert not (tmp_path / "data-a" / "models").exists()  # nothing written into the data dirs
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["smollm2-135m-instruct"]  # no temp left


def test_a_data_dirs_own_conversion_is_kept(tmp_path, conversions):
    shared = smollm2.ensure_converted(tmp_path / "other")
    own = tmp_path / "data" / "models" / "smollm2-135m-instruct"
    own.mkdir(parents=True)
    (own / "model.safetensors").write_bytes(b"older")
    assert smollm2.ensure_converted(tmp_path / "data") == own != shared and len(conversions) == 1


def test_an_unwritable_cache_converts_into_the_data_dir(tmp_path, conversions, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("RAGKV_MODEL_CACHE", str(tmp_path / "a-file" / "models"))  # cannot be made
    path = smollm2.ensure_converted(tmp_path / "data")
    assert path == tmp_path / "data" / "models" / "smollm2-135m-instruct" and len(conversions) == 1


def test_the_conversion_is_readable_by_other_users_of_a_shared_cache(tmp_path, conversions):
    path = smollm2.ensure_converted(tmp_path / "data")
    assert path.stat().st_mode & 0o777 == 0o755
