"""The cached model catalogue behind ``layertap models``: same rows as a fresh listing, no stale cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from layertap.models import catalog as cat
from layertap.models.registry import _sources


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "layertap" / "models"


def test_cached_listing_equals_a_fresh_one_and_skips_the_source(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ipcl = _sources()["ipcl"]
    fresh = cat.model_catalog("ipcl")
    # independent reference: the source's own list and published weights, read directly
    assert [e.name for e in fresh] == [f"ipcl:{m}" for m in ipcl.list_models()]
    from layertap.models.sources.ipcl import CONFIGS

    assert {e.name.split(":")[1] for e in fresh if e.pretrained} == {n for n, c in CONFIGS.items() if c.get("url")}
    assert all(e.pretrained is not None for e in fresh)
    assert len(list(cache.glob("ipcl-*.json"))) == 1

    def boom() -> list[str]:
        raise AssertionError("the cached list must not ask the source again")

    monkeypatch.setattr(ipcl, "list_models", boom)
    assert cat.model_catalog("ipcl") == fresh  # read back from the cache, equal field by field


def test_damaged_or_stale_cache_is_rebuilt(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = cat.model_catalog("ipcl")
    path = next(cache.glob("ipcl-*.json"))
    path.write_text("[{not json")
    assert cat.model_catalog("ipcl") == fresh  # damaged -> rebuilt, not an error
    # a new library version is a new key: the old file is not read
    path.write_text('[{"name": "ipcl:stale", "pretrained": true, "extra": null, "info": ""}]')
    monkeypatch.setattr(cat, "_version", lambda dist: "99.0")
    assert cat.model_catalog("ipcl") == fresh
    assert cat.model_catalog("ipcl", refresh=True) == fresh


def test_cli_models_rows_come_from_the_catalog(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from layertap.cli.app import main

    assert main(["models", "--source", "ipcl"]) == 0
    first = capsys.readouterr().out
    assert main(["models", "--source", "ipcl"]) == 0
    assert capsys.readouterr().out == first
    rows = {line.split()[0]: line.split()[1] for line in first.splitlines()}
    assert rows["ipcl:ipcl1"] == "pretrained" and rows["ipcl:alexnet_gn"] == "random-only"
