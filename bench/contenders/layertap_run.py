"""Contender 5, layertap: ``lt.extract`` on the image folder with the saved weights file.

Defaults otherwise (channels_last auto, early stop, Zarr store, decoding in ``workers`` processes);
batch size and workers as for every contender. The timed call includes layertap's first-batch full
forward (it learns how often each layer runs) and the manifest. ``layertap_compiled`` passes
``compile=True``: the warm-up compiles; the timed call builds its own graph, which torch.compile
then takes from its cache (that re-trace is timed).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import numpy as np  # noqa: E402

import layertap as lt  # noqa: E402


def main() -> None:
    spec = common.load_spec()
    loaded = lt.load_model(spec["arch"], weights=spec["weights"])
    out = Path(spec["out"])
    opts = {"batch_size": spec["batch_size"], "workers": spec["workers"], "device": "cpu", "progress": False}
    opts["compile"] = bool(spec.get("compile"))
    warm = lt.ImageSet(paths=spec["images"][: spec["batch_size"]], root=spec["image_dir"])
    lt.extract(loaded, warm, spec["layers"], out / "warmup", **opts)
    with common.Timer() as t:
        run = lt.extract(loaded, spec["image_dir"], spec["layers"], out / "run", **opts)
    if run.manifest["images"]["n_stored"] != len(spec["images"]):
        raise SystemExit(f"layertap stored {run.manifest['images']['n_stored']} of {len(spec['images'])} images")
    k = spec["check_n"]
    check = common.save_check(out, {n: np.asarray(run[n][:k]) for n in spec["layers"]})
    common.emit(spec, t.seconds, check=check, version=lt.__version__)


if __name__ == "__main__":
    main()
