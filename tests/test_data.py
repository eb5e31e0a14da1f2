"""Image sets (layouts, lists, THINGS, subsets, shards) and decoding of every mode to RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo
from PIL import Image

import layertap as lt
from layertap.data.images import ImageSet, load_rgb


def test_flat_folder_any_case_extension(flat_dir: Path) -> None:
    s = ImageSet.from_path(flat_dir)
    names = [Path(p).name for p in s.paths]
    assert names == sorted(names) and "a_rgb.JPG" in names and "c.webp" in names and "e.tiff" in names
    assert s.targets is None and s.layout == "flat" and len(s) == 11


def test_every_mode_decodes_to_rgb(flat_dir: Path) -> None:
    for p in ImageSet.from_path(flat_dir).paths:
        img = load_rgb(p)
        assert img.mode == "RGB" and img.size[0] >= 1, p


def test_16bit_gray_is_scaled_not_clipped(flat_dir: Path) -> None:
    raw = np.asarray(Image.open(flat_dir / "j_gray16.png")).astype(np.float64)
    assert raw.max() > 255  # really 16-bit
    rgb = np.asarray(load_rgb(str(flat_dir / "j_gray16.png")))
    np.testing.assert_array_equal(rgb[..., 0], np.rint(raw / 257).astype(np.uint8))
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 200
    arr[:2, :, 3] = 255  # top half opaque red-ish, bottom fully transparent
    Image.fromarray(arr, "RGBA").save(tmp_path / "t.png")
    out = np.asarray(load_rgb(str(tmp_path / "t.png")))
    assert out[0, 0].tolist() == [200, 0, 0] and out[3, 3].tolist() == [255, 255, 255]


def test_cmyk_and_palette(flat_dir: Path) -> None:
    cmyk = np.asarray(load_rgb(str(flat_dir / "h_cmyk.jpg"))).astype(int)
    want = np.asarray(Image.open(flat_dir / "h_cmyk.jpg").convert("RGB")).astype(int)
    assert np.abs(cmyk - want).max() == 0 and cmyk.std() > 10


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = photo("rocket", 0, (120, 80))  # 80 rows x 120 cols
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW when shown
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    assert load_rgb(str(tmp_path / "rot.jpg")).size == (80, 120)
    assert load_rgb(str(tmp_path / "rot.jpg"), exif_transpose=False).size == (120, 80)


def test_class_folders_and_things(tmp_path: Path) -> None:
    for c in ("aardvark", "abacus"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(photo("coffee", i, (64, 64))).save(tmp_path / "images" / c / f"{c}_{i:02d}b.jpg")
    s = ImageSet.from_path(tmp_path / "images")
    assert s.layout == "classes" and s.classes == ["aardvark", "abacus"] and s.targets == [0, 0, 1, 1]
    with pytest.raises(lt.LayertapError, match="things_concepts.tsv not found"):
        ImageSet.from_path(tmp_path / "images", things=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "things_concepts.tsv").write_text(
        "Word\tWordnet ID\tuniqueID\naardvark\tn1\taardvark\nabacus (frame)\tn2\tabacus\n"
    )
    t = ImageSet.from_path(tmp_path / "images", things=True)
    assert t.layout == "things" and t.concepts == {"aardvark": "aardvark", "abacus": "abacus (frame)"}


def test_file_lists(tmp_path: Path, image_dir: Path) -> None:
    paths = sorted(image_dir.rglob("*.jpg"))
    txt = tmp_path / "list.txt"
    txt.write_text("# my stimuli\n" + "\n".join(str(p) for p in reversed(paths)) + "\n")
    s = ImageSet.from_path(txt)
    assert s.paths == [str(p) for p in reversed(paths)]  # list order is kept
    csvf = image_dir / "list.csv"
    csvf.write_text("path,label\n" + "".join(f"{p.relative_to(image_dir)},{p.parent.name}\n" for p in paths))
    c = ImageSet.from_path(csvf)
    assert c.classes == ["cat", "dog", "rocket"] and c.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    csvf.unlink()


def test_fraction_is_reproducible_and_ordered(image_dir: Path) -> None:
    s = ImageSet.from_path(image_dir)
    a, b, c = s.subset(0.5, seed=1), s.subset(0.5, seed=1), s.subset(0.5, seed=2)
    assert a.paths == b.paths and len(a) == 4 and a.paths == sorted(a.paths)
    assert a.paths != c.paths
    assert a.targets == [s.targets[s.paths.index(p)] for p in a.paths]
    with pytest.raises(lt.LayertapError, match="fraction"):
        s.subset(1.5)


@pytest.mark.parametrize("align", [1, 2, 4, 5])
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_shards_are_disjoint_and_cover(image_dir: Path, count: int, align: int) -> None:
    s = ImageSet.from_path(image_dir)  # 9 images
    shards = [s.shard(i, count, align=align) for i in range(count)]
    assert sum((sh.paths for sh in shards), []) == s.paths  # disjoint, in order, nothing left out
    for sh in shards:
        assert sh.targets == [s.targets[s.paths.index(p)] for p in sh.paths]
    starts = [sh.selection["shard_offset"] for sh in shards]
    assert starts == [sum(len(x) for x in shards[:i]) for i in range(count)]
    # every cut sits on a batch boundary (or at the end): each shard computes whole batches of the unsharded run
    assert all(b % align == 0 or b == len(s) for b in starts[1:])
    batches = [-(-len(sh) // align) for sh in shards]
    assert sum(batches) == -(-len(s) // align) and max(batches) - min(batches) <= 1  # balanced in batches


def test_missing_and_empty_inputs(tmp_path: Path) -> None:
    with pytest.raises(lt.LayertapError, match="image path not found"):
        ImageSet.from_path(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(lt.LayertapError, match="no images in"):
        ImageSet.from_path(tmp_path / "empty")


def test_mixed_formats_extract(flat_dir: Path, tmp_path: Path) -> None:
    from conftest import independent_rgb, reference_outputs
    from torchvision.models import AlexNet_Weights

    model = lt.load_model("alexnet", weights="random")
    run = lt.extract(model, flat_dir, ["features.2"], tmp_path / "r", workers=0, batch_size=4)
    assert run["features.2"].shape[0] == 11 and not run.skipped
    # each row is the model's output for its image, decoded and preprocessed without layertap
    tf = AlexNet_Weights.DEFAULT.transforms()
    x = torch.stack([tf(independent_rgb(flat_dir / p)) for p in run.images])
    want = reference_outputs(model.module, x, ["features.2"])["features.2"][0].numpy()
    np.testing.assert_allclose(run["features.2"][:], want, rtol=1e-4, atol=1e-4)


def test_fast_decode_is_opt_in_close_and_recorded(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    for i, name in enumerate(["astronaut", "coffee", "rocket"]):
        Image.fromarray(photo(name, i, (1200, 900))).save(big / f"{name}.jpg", quality=90)
    model = lt.load_model("resnet18", weights="random")
    exact = lt.extract(model, big, ["avgpool"], tmp_path / "exact", workers=0)
    fast = lt.extract(model, big, ["avgpool"], tmp_path / "fast", workers=0, fast_decode=True)
    assert exact.manifest["decode"]["jpeg_draft"] is None
    assert "256" in fast.manifest["decode"]["jpeg_draft"] and fast.manifest["spec"]["jpeg_draft"] == 256
    # drafted 1200x900 -> 600x450 (both sides >= 256), then the same resize: close, not identical
    assert load_rgb(str(big / "coffee.jpg"), draft=256).size == (600, 450)
    a, b = exact["avgpool"][:], fast["avgpool"][:]
    assert not np.array_equal(a, b)
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.02)
