"""One configuration source: flags and variables generated from the settings, one default each."""

from __future__ import annotations

import dataclasses

import pytest

from registry.settings import RegistrySettings, add_flags, from_args
from server.engine.request import EngineConfig
from server.settings import Settings
from training.train import TrainSettings, build_parser


def _flags(cls) -> set[str]:
    import argparse

    p = argparse.ArgumentParser()
    add_flags(p, cls)
    return {o for a in p._actions for o in a.option_strings if o.startswith("--")} - {"--help"}


@pytest.mark.parametrize("cls", [Settings, TrainSettings, RegistrySettings])
def test_every_setting_has_its_flag(cls):
    flags = _flags(cls)
    for name, field in cls.model_fields.items():
        if (field.json_schema_extra or {}).get("env_only"):
            assert "--" + name.replace("_", "-") not in flags  # keys stay out of process listings
        else:
            assert "--" + name.replace("_", "-") in flags, name


def test_flag_beats_variable_beats_default(monkeypatch):
    import argparse

    p = argparse.ArgumentParser()
    add_flags(p, Settings)
    assert from_args(Settings, p.parse_args([])).max_batch_size == 128
    monkeypatch.setenv("POLYPROMPT_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("POLYPROMPT_CUDA_GRAPHS", "false")
    s = from_args(Settings, p.parse_args([]))
    assert s.max_batch_size == 8 and s.cuda_graphs is False
    s = from_args(Settings, p.parse_args(["--max-batch-size", "4", "--cuda-graphs"]))
    assert s.max_batch_size == 4 and s.cuda_graphs is True


def test_bad_value_is_a_usage_error(capsys):
    p = build_parser()
    with pytest.raises(SystemExit) as e:
        from_args(TrainSettings, p.parse_args(["--task", "t"]), p)  # --data missing
    assert e.value.code == 2 and "--data" in capsys.readouterr().err


def test_engine_defaults_are_the_servers():
    """`Settings.engine_config()` is the one mapping of names; each engine default equals the
    server's, except the queue-wait bound, which only the server sets (an engine driven in
    process, by tests and benchmarks, bounds its queue by length alone)."""
    from_settings = Settings(_env_file=None).engine_config()
    for f in dataclasses.fields(EngineConfig):
        if f.name == "max_queue_wait_s":
            assert from_settings.max_queue_wait_s == 30.0 and f.default is None
            continue
        assert getattr(from_settings, f.name) == f.default, f.name
