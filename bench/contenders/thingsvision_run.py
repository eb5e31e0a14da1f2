"""Contender 3, thingsvision 2.7.3 (runs in bench/.venv-thingsvision; see bench/setup_thingsvision.sh).

Its documented API, as its README uses it: ``get_extractor(model_name, source="torchvision",
device="cpu", pretrained=False, model_path=WEIGHTS)`` (model_path loads our saved state_dict),
``ImageDataset`` + thingsvision's ``DataLoader``, ``extractor.extract_features(batches=...,
module_name(s)=..., flatten_acts=False, output_type="ndarray")`` and ``save_features(...,
file_format="npy")``, one ``features.npy`` per layer.

Differences from layertap that are thingsvision's own design, left as they are:
- its DataLoader decodes in the main process (no worker processes; it has no such option);
- features are gathered in memory and saved at the end (so RSS grows with the number of images);
- ``torch.no_grad`` instead of inference_mode, default memory layout (no channels_last), whole model
  per batch.
Same as everyone: threads, batch size, and the transform — we pass layertap's (the weights'
torchvision transform) to ``ImageDataset(transforms=...)``; thingsvision's own default for
``pretrained=False`` is Resize(256)+CenterCrop(224), which differs for resnet50 (layertap: 232).
"""

import contextlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import numpy as np  # noqa: E402


def run(extractor, names, spec, out: Path) -> None:  # noqa: ANN001
    from thingsvision.utils.data import DataLoader, ImageDataset
    from thingsvision.utils.storing import save_features

    backend = extractor.get_backend()
    dataset = ImageDataset(
        root=spec["image_dir"],
        out_path=str(out),
        backend=backend,
        file_names=names,
        transforms=common.make_transform(spec["arch"]),
    )
    batches = DataLoader(dataset=dataset, batch_size=spec["batch_size"], backend=backend)
    layers = spec["layers"]
    if len(layers) == 1:
        feats = {
            layers[0]: extractor.extract_features(
                batches=batches, module_name=layers[0], flatten_acts=False, output_type="ndarray"
            )
        }
    else:
        feats = extractor.extract_features(
            batches=batches, module_names=layers, flatten_acts=False, output_type="ndarray"
        )
    for name in layers:
        save_features(feats[name], out_path=str(out / name), file_format="npy")


def main() -> None:
    spec = common.load_spec()
    with contextlib.redirect_stdout(sys.stderr):  # thingsvision prints progress on stdout
        from thingsvision import __version__, get_extractor

        extractor = get_extractor(
            model_name=spec["arch"],
            source="torchvision",
            device="cpu",
            pretrained=False,
            model_path=spec["weights"],
        )
        names = [os.path.basename(p) for p in spec["images"]]
        out = Path(spec["out"])
        run(extractor, names[: spec["batch_size"]], spec, out / "warmup")
        with common.Timer() as t:
            run(extractor, names, spec, out / "run")
    k = spec["check_n"]
    check = common.save_check(
        out, {n: np.load(out / "run" / n / "features.npy", mmap_mode="r")[:k] for n in spec["layers"]}
    )
    common.emit(spec, t.seconds, check=check, version=__version__, note="decodes in the main process")


if __name__ == "__main__":
    main()
