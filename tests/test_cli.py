"""The command line, end to end in subprocesses: models, layers, extract (incl. interactive), export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import layertap as lt


def test_models_and_layers(layertap_cli) -> None:
    out = layertap_cli("models", check=True).stdout.split()
    assert "torchvision:alexnet" in out and "torchvision:resnet50" in out
    assert layertap_cli("models", "vgg1", check=True).stdout.split()[0].startswith("torchvision:vgg1")
    table = layertap_cli("layers", "alexnet", check=True).stdout
    assert "features.10" in table and "Conv2d" in table and "256x13x13" in table and "58,631,144" in table


def test_extract_then_export(layertap_cli, image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "acts"
    proc = layertap_cli(
        "extract",
        "--model",
        "alexnet",
        "--weights",
        "random",
        "--layers",
        "features.10",
        "classifier.4",
        "--images",
        str(image_dir),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--flatten",
        check=True,
    )
    assert "stored features.10 9x43264, classifier.4 9x4096" in proc.stderr
    assert "RANDOM" in proc.stderr
    assert "img/s" not in proc.stderr, "progress bar must stay quiet when stderr is not a terminal"
    run = lt.open_run(out)
    layertap_cli("export", str(out), "--format", "txt", check=True)
    back = np.loadtxt(out / "export-txt" / "classifier.4.txt", dtype=np.float32)
    np.testing.assert_array_equal(back, run["classifier.4"][:])


def test_seed_flag_spellings(layertap_cli, image_dir: Path, tmp_path: Path) -> None:
    import torch
    import torchvision.models as tvm

    torch.manual_seed(0)
    weights = tmp_path / "alexnet.pth"
    torch.save(tvm.alexnet().state_dict(), weights)
    out = tmp_path / "acts"
    layertap_cli(
        "extract",
        "--model_name",
        "alexnet",
        "--module_name",
        "classifier.4",
        "--model_path",
        str(weights),
        "--batch_size",
        "4",
        "--in_path",
        str(image_dir),
        "--out_path",
        str(out),
        "--device",
        "cpu",
        "--rnd_seed",
        "42",
        "--flatten_acts",
        "--file_format",
        ".npy",
        "--fraction",
        "0.5",
        check=True,
    )
    m = json.loads((out / "manifest.json").read_text())
    assert m["options"]["seed"] == 42 and m["options"]["fraction"] == 0.5 and m["options"]["batch_size"] == 4
    assert m["model"]["weights"]["kind"] == "file" and m["images"]["n_stored"] == 4
    assert np.load(out / "export-npy" / "classifier.4.npy").shape == (4, 4096)


def test_interactive_mode(layertap_cli, image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "acts"
    proc = layertap_cli(
        "extract",
        "--model",
        "alexnet",
        "--weights",
        "random",
        "--interactive",
        "--images",
        str(image_dir),
        "--out",
        str(out),
        input="features.99\nclassifier.4 features.1\n",
        check=True,
    )
    assert "(classifier): Sequential(" not in proc.stdout  # not the nn.Module repr, but the layers table
    assert re.search(r"^  classifier\.4 +Linear +4096 +16,781,312$", proc.stdout, re.M)
    assert re.search(r"^penultimate +classifier\.6:input +4096$", proc.stdout, re.M)  # with the aliases
    assert "unknown layer 'features.99'" in proc.stderr  # a typo is answered, then asked again
    assert lt.open_run(out).layers == ["classifier.4", "features.1"]


def test_errors_are_one_line_with_exit_code_2(layertap_cli, image_dir: Path, tmp_path: Path) -> None:
    p = layertap_cli(
        "extract",
        "--model",
        "alexnet",
        "--weights",
        "random",
        "--layers",
        "classifer.4",
        "--images",
        str(image_dir),
        "--out",
        str(tmp_path / "x"),
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "unknown layer 'classifer.4' (did you mean: classifier.4" in p.stderr
    p = layertap_cli("layers", "alexnett")
    assert p.returncode == 2 and "did you mean: alexnet" in p.stderr and "Traceback" not in p.stderr
    p = layertap_cli(
        "extract",
        "--model",
        "alexnet",
        "--weights",
        "random",
        "--layers",
        "fc",
        "--images",
        str(tmp_path / "nope"),
        "--out",
        str(tmp_path / "x"),
    )
    assert p.returncode == 2 and "image path not found" in p.stderr
    p = layertap_cli(
        "extract",
        "--model",
        "alexnet",
        "--interactive",
        "--weights",
        "random",
        "--images",
        str(image_dir),
        "--out",
        str(tmp_path / "y"),
        input="",
    )
    assert p.returncode == 2 and "no layer chosen" in p.stderr


def test_help_is_complete(layertap_cli) -> None:
    text = layertap_cli("extract", "--help", check=True).stdout
    for flag in (
        "--model",
        "--layers",
        "--images",
        "--out",
        "--weights",
        "--flatten",
        "--dtype",
        "--fraction",
        "--workers",
        "--device",
        "--things",
        "--on-error",
        "--overwrite",
        "--interactive",
        "--module_name",
    ):
        assert flag in text, flag


def test_reduce_and_model_options(layertap_cli, image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "acts"
    layertap_cli(
        "extract",
        "--model",
        "ipcl:alexnet_gn",
        "--weights",
        "random",
        "--option",
        "transform=validation",
        "--layers",
        "conv_block_5",
        "fc7",
        "--reduce",
        "conv_block_5=max",
        "--images",
        str(image_dir),
        "--out",
        str(out),
        check=True,
    )
    run = lt.open_run(out)
    assert run["conv_block_5"].shape == (9, 256) and run["fc7"].shape == (9, 4096)
    assert run.manifest["model"]["ipcl_transform"] == "validation"
    assert run.manifest["layers"]["conv_block_5"]["reduce"] == "max"
    model = lt.load_model("ipcl:alexnet_gn", weights="random", transform="validation")
    with lt.Extractor(model, ["conv_block_5"]) as tap:
        from PIL import Image

        x = torch.stack([model.transform(Image.open(image_dir / p).convert("RGB")) for p in run.images])
        want = tap(x)["conv_block_5"].amax(dim=(2, 3))
    np.testing.assert_allclose(run["conv_block_5"][:], want.numpy(), rtol=1e-4, atol=1e-4)


def test_postprocess_analysis_and_formats_from_the_command_line(layertap_cli, image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "acts"
    layertap_cli(
        "extract",
        "--model",
        "alexnet",
        "--weights",
        "random",
        "--layers",
        "features.5",
        "features.12",
        "classifier.4",
        "--images",
        str(image_dir),
        "--out",
        str(out),
        "--center_acts",
        "--normalize_reps",
        "--compress_acts",
        "3",
        "--file_format",
        ".mat",
        check=True,
    )
    raw, processed = lt.open_run(out), lt.open_run(out / "processed")
    x = raw["classifier.4"][:].astype(np.float64)
    x = x - x.mean(0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    u, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    vt = vt[:3] * np.sign(vt[np.arange(3), np.abs(vt[:3]).argmax(1)])[:, None]  # largest |loading| > 0
    want = (x - x.mean(0)) @ vt.T
    got = processed["classifier.4"][:]
    assert got.shape == (9, 3)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)  # signs included: the documented convention
    from scipy.io import loadmat

    mat = loadmat(out / "processed" / "export-mat" / "classifier.4.mat")
    np.testing.assert_array_equal(mat["activations"], got)

    layertap_cli(
        "ensemble",
        str(out),
        "--layers",
        "features.5",
        "features.12",
        "--penultimate",
        "classifier.4",
        "--pca",
        "4",
        "--out",
        str(tmp_path / "ens"),
        check=True,
    )
    assert lt.open_run(tmp_path / "ens")["ensemble"].shape == (9, 4)

    layertap_cli(
        "rdm",
        str(out),
        "--layer",
        "classifier.4",
        "--metric",
        "correlation",
        "--out",
        str(tmp_path / "rdm.npy"),
        "--plot",
        str(tmp_path / "rdm.png"),
        check=True,
    )
    r = np.load(tmp_path / "rdm.npy")
    np.testing.assert_allclose(r, 1 - np.corrcoef(raw["classifier.4"][:].astype(np.float64)), atol=1e-6)
    assert (tmp_path / "rdm.png").stat().st_size > 1000
    proc = layertap_cli("compare", str(out), "--method", "cka-linear", "--out", str(tmp_path / "cmp.csv"), check=True)
    assert proc.stdout.splitlines()[0].split() == ["features.5", "features.12", "classifier.4"]  # full labels
    import csv

    with open(tmp_path / "cmp.csv", newline="") as f:
        table = list(csv.reader(f))
    names = ["features.5", "features.12", "classifier.4"]
    assert table[0] == ["", *names] and [r[0] for r in table[1:]] == names
    acts = {n: raw[n][:].reshape(9, -1).astype(np.float64) for n in names}
    for r, a in zip(table[1:], names, strict=True):
        for value, b in zip(r[1:], names, strict=True):
            xc, yc = acts[a] - acts[a].mean(0), acts[b] - acts[b].mean(0)  # linear CKA with centred Grams
            k, m = xc @ xc.T, yc @ yc.T
            want = np.sum(k * m) / (np.linalg.norm(k) * np.linalg.norm(m))
            assert float(value) == pytest.approx(want, rel=1e-8), (a, b)


def test_random_projection_on_the_fly_matches_offline(image_dir: Path, tmp_path: Path) -> None:
    model = lt.load_model("alexnet", weights="random", seed=4)
    full = lt.extract(model, image_dir, ["features.5"], tmp_path / "full", workers=0)
    proj = lt.extract(model, image_dir, ["features.5"], tmp_path / "srp", workers=0, reduce="srp:256:7")
    assert proj["features.5"].shape == (9, 256) and proj.manifest["layers"]["features.5"]["reduce"] == "srp:256:7"
    want = lt.SparseRandomProjection(256, seed=7).apply_numpy(full["features.5"][:])
    np.testing.assert_allclose(proj["features.5"][:], want, rtol=1e-3, atol=1e-3)


def test_extract_compiled_matches_reference(layertap_cli, image_dir: Path, tmp_path: Path) -> None:
    import torchvision.models as tvm
    from conftest import reference_batch, reference_outputs

    torch.manual_seed(5)
    weights = tmp_path / "resnet18.pt"
    ref_model = tvm.resnet18().eval()
    torch.save(ref_model.state_dict(), weights)
    layers = ["layer1.0.bn2", "layer2", "avgpool"]  # bn2 feeds an in-place add; avgpool ends the graph
    out = tmp_path / "compiled"
    args = ["--model", "resnet18", "--weights", str(weights), "--layers", *layers, "--images", str(image_dir)]
    layertap_cli("extract", *args, "--out", str(out), "--batch-size", "4", "--workers", "0", "--compile", check=True)
    run = lt.open_run(out)
    assert run.manifest["compiled"] is True and run.manifest["spec"]["compile"] is True
    paths = [str(image_dir / p) for p in run.images]  # 9 images: the last batch of 1 is padded to 4
    ref = reference_outputs(ref_model, reference_batch(paths, "resnet18"), layers)
    for layer in layers:
        np.testing.assert_allclose(run[layer][:], ref[layer][0].numpy(), rtol=1e-4, atol=1e-4, err_msg=layer)


def test_extract_says_what_it_did_once(
    image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished run re-run says only 'nothing to do' (not also 'stored ...'); an interrupted run says
    where it resumes (images done / total, from its cursor); a finished one what it stored. The CLI's
    main() runs in this process (its stderr captured) to keep the test fast."""
    import json
    import logging

    from layertap.cli import app as cli
    from layertap.store import writer as storage

    logger = logging.getLogger("layertap")
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))  # main() installs its own handler
    monkeypatch.setattr(logger, "propagate", logger.propagate)
    monkeypatch.setattr(logger, "level", logger.level)
    out = tmp_path / "acts"
    args = ["extract", "--model", "alexnet", "--weights", "random", "--layers", "classifier.4", "--images"]
    args += [str(image_dir), "--out", str(out), "--batch-size", "2", "--chunk-rows", "2", "--workers", "0"]

    original, calls = storage.RunWriter.add, []

    def interrupted_add(self: storage.RunWriter, *a: object, **k: object) -> None:
        original(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if Ctrl-C after two batches

    with monkeypatch.context() as m:
        m.setattr(storage.RunWriter, "add", interrupted_add)
        assert cli.main(args) == 130
    capsys.readouterr()
    done = json.loads((out / "progress.json").read_text())["next_image"]
    assert 0 < done < 9 and not lt.open_run(out).complete

    assert cli.main(args) == 0
    resumed = capsys.readouterr().err
    assert f"layertap: resuming {out}: {done} of 9 images done, {9 - done} to go" in resumed
    assert f"layertap: stored classifier.4 9x4096 in {out}: {9 - done} images in " in resumed
    assert ", 0 skipped, 9 rows in all" in resumed

    assert cli.main(args) == 0
    again = capsys.readouterr().err
    lines = [line for line in again.splitlines() if "RANDOM" not in line]
    assert lines == [f"layertap: nothing to do: {out} is complete (9 images; pass --overwrite to redo it)"], again
