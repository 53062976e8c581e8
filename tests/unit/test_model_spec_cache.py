"""The model check's cache: the same config.json under the same versions gives the same ModelSpec without
transformers; models with their own code, an unusable cache, or DISTFINALIZE_CACHE_DIR=off build it again."""

from __future__ import annotations

import json
from pathlib import Path

import common
import pytest

from distfinalize.prepare import model
from distfinalize.prepare.model import cached_model_spec, load_model_spec


def no_transformers(config_path: Path):
    raise AssertionError("the model was built again")


@pytest.mark.parametrize("tie", [True, False])
def test_second_run_reads_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tie: bool) -> None:
    common.tiny_config(tie=tie).save_pretrained(tmp_path / "cfg")
    config = tmp_path / "cfg" / "config.json"
    monkeypatch.setenv("DISTFINALIZE_CACHE_DIR", str(tmp_path / "cache"))
    first = cached_model_spec(config)
    assert first == load_model_spec(config) and len(list((tmp_path / "cache").glob("*.json"))) == 1
    monkeypatch.setattr(model, "load_model_spec", no_transformers)
    assert cached_model_spec(config) == first
    config.write_text(config.read_text().replace('"hidden_size": 64', '"hidden_size": 32'))  # another model
    with pytest.raises(AssertionError, match="built again"):
        cached_model_spec(config)


@pytest.mark.parametrize("case", ["auto_map", "off", "unwritable"])
def test_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    common.tiny_config(tie=False).save_pretrained(tmp_path / "cfg")
    config = tmp_path / "cfg" / "config.json"
    cache = tmp_path / "cache"
    if case == "auto_map":
        config.write_text(json.dumps({**json.loads(config.read_text()), "auto_map": {}}))
    if case == "unwritable":
        cache.write_text("a file where the cache dir would be")
    monkeypatch.setenv("DISTFINALIZE_CACHE_DIR", "off" if case == "off" else str(cache))
    assert cached_model_spec(config) == load_model_spec(config)
    assert not cache.is_dir()


def test_generation_config_is_written_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same values under the same versions: the cached file, byte for byte, without importing transformers;
    an invalid config is never cached; with the cache off, nothing is kept."""
    import sys

    from distfinalize.artifacts.generation import write_generation_config
    from distfinalize.errors import UsageError

    for name in "abc":
        (tmp_path / name).mkdir()
    cache = tmp_path / "cache"
    monkeypatch.setenv("DISTFINALIZE_CACHE_DIR", "off")
    data = {"bos_token_id": 1, "eos_token_id": [2, 7], "temperature": 0.6, "do_sample": True}
    first = write_generation_config(tmp_path / "a", data)
    assert not cache.exists() and b'"transformers_version"' in first.read_bytes()
    monkeypatch.setenv("DISTFINALIZE_CACHE_DIR", str(cache))
    with pytest.raises(UsageError, match="not valid"):
        write_generation_config(tmp_path / "b", {"pad_token_id": -1})
    assert not list(cache.glob("generation-*.json"))
    assert write_generation_config(tmp_path / "b", data).read_bytes() == first.read_bytes()
    assert len(list(cache.glob("generation-*.json"))) == 1
    monkeypatch.setitem(sys.modules, "transformers", None)  # any import of transformers now fails
    again = write_generation_config(tmp_path / "c", dict(reversed(data.items())))
    assert again.read_bytes() == first.read_bytes()
    with pytest.raises(ImportError):  # other values: built again
        write_generation_config(tmp_path / "c", {**data, "temperature": 0.7})
