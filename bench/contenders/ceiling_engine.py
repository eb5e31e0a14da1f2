"""Contenders ``ceiling_openvino`` / ``ceiling_onnxruntime``: the ceiling loop (``ceiling.py``) run by a CPU engine.

The *whole* model is exported to ONNX with layertap's exporter (``export_onnx``) and loaded with
layertap's engine settings (``open_session``: float32, the torch threads), both before timing; then the
same batches of tensors, decoded into memory before timing, run through the engine. Beside ``ceiling``
this is the speed-up the engine itself gives on this CPU, with no loader, hooks or I/O: the most that
``layertap_<engine>`` can gain over ``layertap_torch`` end to end.
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import torch  # noqa: E402

from layertap.extraction.engines import export_onnx, open_session  # noqa: E402


def main() -> None:
    spec = common.load_spec()
    model = common.build_model(spec["arch"], spec["weights"])
    transform = common.make_transform(spec["arch"])
    data = common.PILImages(spec["images"], transform)
    x = torch.stack([data[i] for i in range(len(data))]).numpy()  # decoded up front: not timed
    bs = spec["batch_size"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, torch.from_numpy(x[:bs]), path)
        run = open_session(spec["backend"], path)
        run(x[:bs])  # warm-up
        with common.Timer() as t:
            for i in range(0, len(x), bs):
                run(x[i : i + bs])
    common.emit(spec, t.seconds, note=f"{spec['backend']}; decoded in memory before timing; whole model")


if __name__ == "__main__":
    main()
