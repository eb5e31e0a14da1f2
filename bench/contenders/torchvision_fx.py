"""Contender 4, torchvision's ``create_feature_extractor`` (torch.fx), where the model traces.

The traced graph is cut after the requested nodes (so, like layertap, it does not run layers past
the deepest one). Return nodes are the job's module names. Same loader, transform, threads,
inference_mode and channels_last as the reference; one ``.npy`` per batch and layer.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def run(extractor, paths, spec, out: Path, cl: bool) -> None:  # noqa: ANN001
    loader = common.pil_loader(paths, spec)
    for name in spec["layers"]:
        (out / name).mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for b, x in enumerate(loader):
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            feats = extractor(x)
            for name in spec["layers"]:
                np.save(out / name / f"{b:05d}.npy", feats[name].contiguous().numpy())  # C order: fast np.save


def main() -> None:
    spec = common.load_spec()
    from torchvision.models.feature_extraction import create_feature_extractor

    model = common.build_model(spec["arch"], spec["weights"])
    cl = common.uses_channels_last(model)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    try:
        extractor = create_feature_extractor(model, return_nodes={n: n for n in spec["layers"]}).eval()
    except Exception as err:  # noqa: BLE001 - any tracing failure means "does not trace"
        common.skip(spec, f"does not trace: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        return
    out = Path(spec["out"])
    run(extractor, spec["images"][: spec["batch_size"]], spec, out / "warmup", cl)
    with common.Timer() as t:
        run(extractor, spec["images"], spec, out / "run", cl)
    k = spec["check_n"]
    check = common.save_check(out, {n: np.load(out / "run" / n / "00000.npy")[:k] for n in spec["layers"]})
    common.emit(spec, t.seconds, check=check, channels_last=cl)


if __name__ == "__main__":
    main()
