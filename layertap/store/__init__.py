"""The store: how a run lies on disk. :mod:`.run` (``Run``, ``LayerArray``: reading), :mod:`.writer`
(``RunWriter``, ``DerivedRunWriter``: writing, chunks, checksums, the cursor), :mod:`.manifest` (the typed
``Manifest``, its one reader and writer), :mod:`.verify` (checking chunks), :mod:`.blocks` (chunk sizing and
row-block reading), :mod:`.chunks` (chunk files), :mod:`.files` (file names, atomic writes), :mod:`.export`
(h5/mat/npy/parquet and tensor slices) and :mod:`.labels` (xarray/pandas views)."""
