"""Contender 2, a hand-written reference pipeline: torch DataLoader + one forward hook per layer + np.save.

What a careful user writes by hand: PIL decoding in DataLoader workers (same count as layertap),
the same transform, ``torch.inference_mode``, channels_last for conv nets (layertap's settings), a
forward hook per layer that clones its output (a later in-place ReLU cannot change it), the whole
model run per batch, and one ``.npy`` per batch and layer.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def run(model, paths, spec, out: Path, cl: bool) -> None:  # noqa: ANN001
    loader = common.pil_loader(paths, spec)
    modules = dict(model.named_modules())
    acts = {}
    handles = []
    for name in spec["layers"]:

        def hook(_m, _i, output, name=name):  # noqa: ANN001, ANN202
            acts[name] = output.detach().clone()

        handles.append(modules[name].register_forward_hook(hook))
    for name in spec["layers"]:
        (out / name).mkdir(parents=True, exist_ok=True)
    try:
        with torch.inference_mode():
            for b, x in enumerate(loader):
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                model(x)
                for name in spec["layers"]:
                    np.save(out / name / f"{b:05d}.npy", acts[name].contiguous().numpy())  # C order: fast np.save
    finally:
        for h in handles:
            h.remove()


def main() -> None:
    spec = common.load_spec()
    model = common.build_model(spec["arch"], spec["weights"])
    cl = common.uses_channels_last(model)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    out = Path(spec["out"])
    run(model, spec["images"][: spec["batch_size"]], spec, out / "warmup", cl)
    with common.Timer() as t:
        run(model, spec["images"], spec, out / "run", cl)
    k = spec["check_n"]
    check = common.save_check(out, {n: np.load(out / "run" / n / "00000.npy")[:k] for n in spec["layers"]})
    common.emit(spec, t.seconds, check=check, channels_last=cl)


if __name__ == "__main__":
    main()
