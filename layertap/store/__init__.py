"""The store: how a run lies on disk. :mod:`.run` (``Run``, ``LayerArray``, the writer, verification),
:mod:`.export` (h5/mat/npy/parquet and tensor slices) and :mod:`.labels` (xarray/pandas views)."""
