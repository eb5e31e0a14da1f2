"""Contender 1, the ceiling: a bare ``model(x)`` loop over tensors already decoded and in memory.

No hooks, no I/O, no loader: the images are decoded and transformed before timing, and the model
runs whole (its final output) under ``torch.inference_mode`` with layertap's settings (channels_last
for models with convolutions, same threads, same batch size). ``ceiling_compiled``: the same loop
over ``torch.compile(model)``, compiled during the untimed warm-up. ``ceiling_folded``: the same loop over
the model with its BatchNorms folded into the convolutions by layertap (what ``layertap_torch`` runs), the
bare torch forward that the CPU engines (``ceiling_openvino``) must beat.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    spec = common.load_spec()
    model = common.build_model(spec["arch"], spec["weights"])
    if spec["contender"] == "ceiling_folded":
        from layertap.extraction.graph import fold_batchnorm

        model, _ = fold_batchnorm(model, set())
    transform = common.make_transform(spec["arch"])
    data = common.PILImages(spec["images"], transform)
    x = torch.stack([data[i] for i in range(len(data))])  # decoded up front: not timed
    cl = common.uses_channels_last(model)
    if cl:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if spec.get("compile"):
        model = torch.compile(model)  # compiled in the (untimed) warm-up
    bs = spec["batch_size"]
    with torch.inference_mode():
        model(x[:bs])  # warm-up
        with common.Timer() as t:
            for i in range(0, len(x), bs):
                model(x[i : i + bs])
    common.emit(spec, t.seconds, channels_last=cl, note="decoded in memory before timing; whole model")


if __name__ == "__main__":
    main()
