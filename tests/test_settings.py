"""The settings tree: one precedence (flags > RAGKV_* environment > config file > defaults) for the
library, every command and the sidecar; no model is loaded here."""

from __future__ import annotations

import argparse
import json

import pytest

from ragkv.cli.main import build_parser, main
from ragkv.cli.options import settings_of
from ragkv.engine.config import EngineConfig
from ragkv.engine.settings import Settings, load_settings, nest, origins

# each command with its required arguments
COMMANDS = {
    "ingest": ["ingest", "some/path"],
    "retrieve": ["retrieve", "a question"],
    "query": ["query", "a question"],
    "serve": ["serve"],
    "cache": ["cache", "stats"],
    "demo": ["demo"],
    "config": ["config"],
    "eval": ["eval", "--data", "d.jsonl"],
}


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("RAGKV_"):
            monkeypatch.delenv(name)
    return monkeypatch


def _settings(argv):
    args = build_parser().parse_args(argv)
    from ragkv.cli.serve import server_settings

    return server_settings(args) if args.command == "serve" else settings_of(args)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_data_dir_precedence_per_command(command, clean_env, tmp_path):
    argv = COMMANDS[command]
    config = tmp_path / "ragkv.toml"
    config.write_text('data_dir = "/from/file"\nmodel = "file-model"\n[storage]\npolicy = "cost"\n')
    assert _settings(argv).data_dir == "~/.cache/ragkv"  # defaults
    clean_env.setenv("RAGKV_CONFIG", str(config))
    s = _settings(argv)
    assert (s.data_dir, s.model, s.storage.policy) == ("/from/file", "file-model", "cost")  # file over defaults
    clean_env.setenv("RAGKV_DATA_DIR", "/from/env")
    assert _settings(argv).data_dir == "/from/env"  # environment over file
    s = _settings([*argv, "--data-dir", "/from/flag"])
    assert (s.data_dir, s.model) == ("/from/flag", "file-model")  # flag over environment; the rest stays
    other = tmp_path / "other.toml"
    other.write_text('model = "other-file"\n')
    assert _settings([*argv, "--config", str(other)]).model == "other-file"  # --config over $RAGKV_CONFIG


@pytest.mark.parametrize("command", ["query", "demo"])
def test_blend_flags_beat_nested_environment(command, clean_env):
    clean_env.setenv("RAGKV_BLEND__STRATEGY", "naive")
    clean_env.setenv("RAGKV_BLEND__RECOMPUTE_RATIO", "0.3")
    s = _settings(COMMANDS[command])
    assert (s.blend.strategy, s.blend.recompute_ratio) == ("naive", 0.3)
    s = _settings([*COMMANDS[command], "--strategy", "epic"])
    assert (s.blend.strategy, s.blend.recompute_ratio) == ("epic", 0.3)


def test_serve_flags_env_and_file(clean_env, tmp_path):
    config = tmp_path / "s.toml"
    config.write_text('[server]\nport = 9001\nqueue_size = 5\napi_keys = {k1 = "tenant-a"}\n')
    clean_env.setenv("RAGKV_SERVER__QUEUE_SIZE", "7")
    s = _settings(["serve", "--config", str(config), "--host", "0.0.0.0"])
    assert (s.server.host, s.server.port, s.server.queue_size) == ("0.0.0.0", 9001, 7)
    assert s.queue_size == 7 and s.auth_enabled and s.api_keys == {"k1": "tenant-a"}  # flat view for the HTTP layer


def test_ingest_chunking_flags_and_sizes(clean_env):
    clean_env.setenv("RAGKV_RETRIEVER__MAX_DOCUMENT_BYTES", "1MiB")
    s = _settings(["ingest", "p", "--chunk-min", "64", "--chunk-max", "128"])
    assert (s.retriever.chunk_min_tokens, s.retriever.chunk_max_tokens) == (64, 128)
    assert s.retriever.max_document_bytes == 1 << 20
    s = _settings(["ingest", "p", "--max-document-size", "2KB"])
    assert EngineConfig.from_settings(s).retriever.max_document_bytes == 2000


def test_explicit_none_never_beats_the_environment(clean_env):
    """The bug class of `EngineConfig.from_env(data_dir=None)`: None means "not given"."""
    from ragkv.engine.config import EngineConfig

    clean_env.setenv("RAGKV_DATA_DIR", "/env/dir")
    clean_env.setenv("RAGKV_MODEL", "env-model")
    cfg = EngineConfig.load(data_dir=None, model=None)
    assert (cfg.data_dir, cfg.model) == ("/env/dir", "env-model")
    assert EngineConfig.load(data_dir="/given").data_dir == "/given"


def test_built_configs_pass_through_the_library_entry(clean_env, tmp_path):
    from ragkv.engine.config import EngineConfig
    from ragkv.storage.config import StorageConfig, TierConfig

    clean_env.setenv("RAGKV_DEVICE", "cuda")
    storage = StorageConfig(tiers=(TierConfig("cpu", 1 << 20),))
    cfg = EngineConfig.load(storage=storage, data_dir=str(tmp_path))
    assert cfg.storage is storage and cfg.storage_config() is storage
    assert (cfg.device, cfg.data_dir) == ("cuda", str(tmp_path))


def test_storage_tiers_codecs_and_policy_from_the_environment(clean_env, tmp_path):
    tiers = [{"kind": "cpu", "capacity": "1GiB", "codec": "int8"}, {"kind": "disk", "capacity": "8GB", "codec": "lz4"}]
    clean_env.setenv("RAGKV_STORAGE__TIERS", json.dumps(tiers))
    clean_env.setenv("RAGKV_STORAGE__POLICY", "cost")
    clean_env.setenv("RAGKV_STORAGE__DECODE_WORKERS", "0")
    clean_env.setenv("RAGKV_KV_DTYPE", "bfloat16")
    store = EngineConfig.from_settings(load_settings(data_dir=str(tmp_path))).storage_config()
    assert [(t.kind, t.capacity_bytes, t.codec) for t in store.tiers] == [
        ("cpu", 1 << 30, "int8"),
        ("disk", 8e9, "lz4"),
    ]
    assert (store.policy, store.decode_workers, store.kv_dtype) == ("cost", 0, "bfloat16")
    assert store.disk_dir == str(tmp_path / "cache") and store.catalog_url == f"sqlite:///{tmp_path}/catalog.sqlite"


def test_default_store_follows_the_device(clean_env):
    store = EngineConfig.from_settings(load_settings(device="cuda:0")).storage_config()
    assert [t.kind for t in store.tiers] == ["gpu", "disk"]


def test_bad_values_say_what_is_accepted(clean_env, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown setting 'colour'"):
        nest({"colour": "blue"})
    with pytest.raises(ValueError, match="cacheblend"):
        load_settings(**{"blend.strategy": "magic"})
    with pytest.raises(ValueError, match="cpu, cuda and cuda:N"):
        load_settings(device="tpu")
    with pytest.raises(ValueError, match="unknown codec 'zip'"):
        EngineConfig.from_settings(
            load_settings(**{"storage.tiers": [{"kind": "cpu", "capacity": "1GiB", "codec": "zip"}]})
        )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")
    (tmp_path / "c.yaml").write_text("a: 1")
    with pytest.raises(ValueError, match=".toml and .json"):
        load_settings(tmp_path / "c.yaml")
    assert main(["query", "q", "--strategy", "magic"]) == 2
    assert "setting blend: unknown strategy 'magic'; accepted: full, prefix" in capsys.readouterr().err


def test_the_blend_section_is_the_blend_folders_config(clean_env):
    """One config model: the settings' `blend` section is BlendConfig itself, checked once by its own rules
    (types by pydantic, then BlendConfig's checks), with its defaults; no copy to drift."""
    from ragkv.blend.config import BlendConfig

    assert Settings.model_fields["blend"].annotation is BlendConfig and Settings().blend == BlendConfig()
    clean_env.setenv("RAGKV_BLEND__CHECK_LAYERS", "[2, 4]")
    s = load_settings(**{"blend.strategy": "cacheblend+query", "craft_focus": "0.5"})
    assert s.blend == BlendConfig(strategy="cacheblend+query", check_layers=(2, 4), craft_focus=0.5)
    assert EngineConfig.from_settings(s).blend is s.blend
    with pytest.raises(ValueError, match="setting blend: check_layers must be strictly increasing"):
        load_settings(**{"blend.check_layers": [3, 1]})
    with pytest.raises(ValueError, match=r"setting blend.craft_alpha: Input should be a valid number"):
        load_settings(**{"blend.craft_alpha": "lots"})
    with pytest.raises(ValueError, match="setting blend.nope: Unexpected keyword argument"):
        load_settings(**{"blend.nope": 1})


def test_config_command_prints_values_and_origins(clean_env, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('[blend]\nstrategy = "naive"\n[server]\napi_keys = {secret-key = "t"}\n')
    clean_env.setenv("RAGKV_STORAGE__POLICY", "cost")
    assert main(["config", "--config", str(config), "--model", "m", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["model"] == "m" and out["origins"]["model"] == "flag"
    assert out["origins"]["storage.policy"] == "env RAGKV_STORAGE__POLICY"
    assert out["origins"]["blend.strategy"] == f"file {config}" and out["origins"]["device"] == "default"
    assert out["settings"]["server"]["api_keys"] == {"sec***": "t"}  # keys are not printed
    assert [t["kind"] for t in out["settings"]["storage"]["tiers"]] == ["cpu", "disk"]  # the store to be built
    clean_env.setenv("RAGKV_DEVCE", "cuda")  # a typo
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    assert "# ignored: RAGKV_DEVCE names no setting" in text and 'device = "cpu"' in text
    assert "[storage]" in text and 'policy = "cost"' in text and "# env RAGKV_STORAGE__POLICY" in text


def test_origins_name_the_source(clean_env, tmp_path):
    clean_env.setenv("RAGKV_DEVICE", "cuda")
    s = load_settings(None, {"namespace": "ns1"})
    where = origins(s, None, {"namespace": "ns1"})
    assert where["namespace"] == "flag" and where["device"] == "env RAGKV_DEVICE" and where["dtype"] == "default"
    assert isinstance(s, Settings)


def test_json_config_file(clean_env, tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"namespace": "team-a", "retriever": {"chunk_max_tokens": 300}}))
    s = load_settings(config)
    assert (s.namespace, s.retriever.chunk_max_tokens) == ("team-a", 300)
    assert EngineConfig.from_settings(s).retriever.namespace == "team-a"


def test_a_packed_tier_takes_the_models_calibrated_schedule_from_the_data_dir(clean_env, tmp_path):
    from ragkv.compression.packed import PackedConfig
    from ragkv.compression.schedule import CodecSchedule, schedule_path
    from ragkv.storage.build import build_store

    schedule = CodecSchedule("model-A", (2, 5, 3), (2, 4, 2), 2.5, value_group=(0, 1))
    schedule.save(schedule_path(tmp_path / "calibration", "model-A"))  # where `ragkv calibrate` writes it
    tiers = [{"kind": "cpu", "capacity": "1MiB", "codec": "packed"}]
    clean_env.setenv("RAGKV_STORAGE__TIERS", json.dumps(tiers))
    storage = EngineConfig.from_settings(load_settings(data_dir=str(tmp_path))).storage_config()
    assert storage.codec_schedule == str(tmp_path / "calibration")
    assert build_store(storage, "model-A").tiers[0].codec.config == schedule.packed_config()
    assert build_store(storage, "model-B").tiers[0].codec.config == PackedConfig()  # another model: defaults


def test_every_settings_flag_is_named_after_its_setting():
    """A flag that sets a setting stores it under the setting's own name; the settings tree finds its path
    (`nest`), so no command keeps a flag -> path table that could drift."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    seen = set()
    for name, sub in commands.items():
        dests = {a.dest for a in sub._actions}
        for setting in sub.get_default("settings_flags") or ():
            assert setting in dests, (name, setting)
            path = nest({setting: 1})
            assert path, (name, setting)  # an unknown name raises "unknown setting" here
            seen.add(setting)
    assert {"recompute_ratio", "queue_size", "index_kind", "craft_variants", "max_document_bytes"} <= seen
    assert settings_of(parser.parse_args(["query", "q", "--ratio", "0.3"])).blend.recompute_ratio == 0.3
    ingest = parser.parse_args(["ingest", "--index", "hnsw", "--chunk-max", "300"])
    assert (settings_of(ingest).retriever.index_kind, settings_of(ingest).retriever.chunk_max_tokens) == ("hnsw", 300)
