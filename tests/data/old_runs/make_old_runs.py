"""How the runs in this folder were made: by layertap as of commit 5c07f40 (before chunk checksums,
'.'-separated chunk keys and written all-zero chunks), for tests/test_store_compat.py::

    git archive 5c07f40 layertap | tar -x -C /tmp/old
    mkdir /tmp/r1imgs && cp examples/images/textures/{grass,gravel,brick}.jpg /tmp/r1imgs/
    PYTHONPATH=/tmp/old python tests/data/old_runs/make_old_runs.py /tmp/out
"""

import shutil
import sys
from pathlib import Path

import numpy as np

import layertap as lt
from layertap.store import writer as storage

out = Path(sys.argv[1])
shutil.rmtree(out, ignore_errors=True)
out.mkdir(parents=True)
kw = {"dtype": "float16", "chunk_rows": 2, "batch_size": 2, "workers": 0, "device": "cpu"}
lt.extract("resnet18", "/tmp/r1imgs", ["avgpool"], out / "complete", weights="random", seed=0, **kw)

# half-finished: interrupted after the first batch (chunk 0 committed)
orig = storage.RunWriter.add
calls = []


def add(self, *a, **k):
    calls.append(1)
    if len(calls) == 2:
        raise KeyboardInterrupt
    return orig(self, *a, **k)


storage.RunWriter.add = add
try:
    lt.extract("resnet18", "/tmp/r1imgs", ["avgpool"], out / "unfinished", weights="random", seed=0, **kw)
except KeyboardInterrupt:
    pass
storage.RunWriter.add = orig

# an all-zero chunk (the old zarr default: not written as a file)
w = storage.RunWriter(out / "zero", {"n_images": 4})
w.begin({"layertap": "run"})
w.create_layers({"zero": {"shape": [3]}, "ones": {"shape": [3]}}, 4, "float32", 2)
w.add({"zero": np.zeros((4, 3), np.float32), "ones": np.ones((4, 3), np.float32)}, [0, 1, 2, 3])
w.finish(4)
rows = [{"path": f"im{i}.png"} for i in range(4)]
w.complete({"images": {"root": "/x", "rows": rows, "skipped": [], "n_total": 4, "n_stored": 4}})
w.close()
