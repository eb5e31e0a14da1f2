"""Contender 5, layertap: ``lt.extract`` on the image folder with the saved weights file.

Defaults otherwise (channels_last auto, early stop, Zarr store, decoding in ``workers`` processes);
batch size and workers as for every contender. The timed call includes layertap's first-batch full
forward (it learns how often each layer runs) and the manifest. Both calls share one held
``lt.Extractor`` (layertap's explicit reuse: BatchNorm folded, and with ``compile=True`` the graph
traced and compiled, once, in the warm-up). ``layertap_compiled`` passes ``compile=True``.
``layertap_torch`` / ``layertap_onnxruntime`` / ``layertap_openvino`` use that backend; plain ``layertap``
the default, ``auto``, resolved for the timed job (512 images) as ``lt.extract`` would. An engine's
one-off export (cached on disk: a user's later runs skip it) happens in the warm-up and is printed to
the contender's log, not timed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import numpy as np  # noqa: E402

import layertap as lt  # noqa: E402
from layertap.extraction.engines import resolve_backend  # noqa: E402


def main() -> None:
    spec = common.load_spec()
    loaded = lt.load_model(spec["arch"], weights=spec["weights"])
    out = Path(spec["out"])
    opts = {"batch_size": spec["batch_size"], "workers": spec["workers"], "device": "cpu", "progress": False}
    opts["compile"] = bool(spec.get("compile"))
    warm = lt.ImageSet(paths=spec["images"][: spec["batch_size"]], root=spec["image_dir"])
    backend = resolve_backend(spec.get("backend", "auto"), "cpu", len(spec["images"]), compile=opts["compile"])
    tap = lt.Extractor(loaded, spec["layers"], fold_bn=True, compile=opts["compile"], backend=backend)
    with common.Timer() as w:
        lt.extract(tap, warm, spec["layers"], out / "warmup", **opts)
    print(f"backend {spec.get('backend', 'auto')} -> {backend}: warm-up {w.seconds:.1f} s", file=sys.stderr)
    with common.Timer() as t:
        run = lt.extract(tap, spec["image_dir"], spec["layers"], out / "run", **opts)
    if run.manifest["images"]["n_stored"] != len(spec["images"]):
        raise SystemExit(f"layertap stored {run.manifest['images']['n_stored']} of {len(spec['images'])} images")
    k = spec["check_n"]
    check = common.save_check(out, {n: np.asarray(run[n][:k]) for n in spec["layers"]})
    common.emit(spec, t.seconds, check=check, version=lt.__version__)


if __name__ == "__main__":
    main()
