"""Planning a run: bytes equal what a run writes, free-space refusal, --reduce suggestions, dry run."""

from __future__ import annotations

import importlib
import re
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

import layertap as lt
from layertap.cli import app as cli

plan_mod = importlib.import_module("layertap.extraction.planning")


@pytest.fixture(scope="module")
def resnet18() -> lt.LoadedModel:
    return lt.load_model("resnet18", weights="random", seed=0)


def test_plan_bytes_equal_what_the_run_writes(resnet18: lt.LoadedModel, image_dir: Path, tmp_path: Path) -> None:
    kwargs = {"reduce": {"layer4": "avg"}, "dtype": "float16", "batch_size": 4}
    layers = ["layer3", "layer4", "avgpool"]
    p = lt.plan(resnet18, image_dir, layers, out=tmp_path / "acts", **kwargs)
    run = lt.extract(resnet18, image_dir, layers, tmp_path / "acts", progress=False, **kwargs)
    written = {name: np.asarray(run[name]).astype(np.float16) for name in run.layers}
    assert {lp.name: lp.shape for lp in p.layers} == {k: v.shape[1:] for k, v in written.items()}
    assert p.total_bytes == sum(v.nbytes for v in written.values())
    assert p.n_images == len(run.images) == 9
    assert [lp.reduce for lp in p.layers] == [None, "avg", None]
    assert p.seconds_per_image is not None and p.seconds_per_image > 0
    assert not (tmp_path / "other").exists()

    flat = lt.plan(resnet18, image_dir, ["layer2"], flatten=True, probe=0)
    assert flat.layers[0].shape == (128 * 28 * 28,) and flat.total_bytes == 9 * 128 * 28 * 28 * 4
    assert flat.seconds_per_image is None  # probe=0: shapes only


def test_reduce_suggestions_match_a_plan_with_that_reducer(resnet18: lt.LoadedModel, image_dir: Path) -> None:
    p = lt.plan(resnet18, image_dir, ["layer3", "fc"], probe=0)
    specs = dict(p.suggestions)
    assert {"avg", "avg:2", "srp:4096"} <= set(specs)
    for spec in ("avg", "srp:4096"):
        assert specs[spec] == lt.plan(resnet18, image_dir, ["layer3", "fc"], reduce=spec, probe=0).total_bytes
    assert "--reduce avg" in str(p)


def _tiny_disk(free: int):  # noqa: ANN202
    usage = namedtuple("usage", "total used free")
    return lambda _path: usage(10 * free, 9 * free, free)


def test_extract_refuses_a_run_that_does_not_fit_unless_yes(
    image_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[Path] = []

    def tiny(path):  # noqa: ANN001, ANN202
        seen.append(Path(path))
        return _tiny_disk(1000)(path)

    monkeypatch.setattr(plan_mod.shutil, "disk_usage", tiny)
    out = tmp_path / "not" / "yet" / "acts"
    args = ["extract", "--model", "resnet18", "--weights", "random", "--layers", "avgpool", "--images", str(image_dir)]
    code = cli.main([*args, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "needs 18.4 kB" in err and "--yes" in err  # 9 images x 512 x 4 bytes
    assert not out.exists() and not (tmp_path / "not").exists()  # refused before any work
    assert seen == [tmp_path]  # the nearest existing parent

    assert cli.main([*args, "--out", str(out), "--quiet", "--yes"]) == 0
    assert lt.open_run(out)["avgpool"].shape == (9, 512, 1, 1)


def test_plan_command_and_dry_run_write_nothing(
    image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "acts"
    args = ["--model", "resnet18", "--weights", "random", "--layers", "layer4", "--images", str(image_dir)]
    assert cli.main(["plan", *args, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^layer4 +512x7x7 ", text, re.M) and "estimated time:" in text and "--reduce avg " in text
    assert "903.2 kB" in text  # 9 x 512 x 7 x 7 x 4 bytes
    assert not out.exists()
    monkeypatch.setattr(plan_mod.shutil, "disk_usage", _tiny_disk(10))
    assert cli.main(["extract", *args, "--out", str(out), "--dry-run"]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert not out.exists()
