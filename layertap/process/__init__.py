"""Post-processing of finished runs (a stage after the Store; reads a run, writes a new run, never reaches back
into extraction): :mod:`.postprocess` (center, normalize, PCA or projection of every layer), :mod:`.pca`
(:class:`~layertap.process.pca.PCA`), :mod:`.projection` (sparse random projection), :mod:`.ensemble`
(feature-map ensembles) and :mod:`.blocks` (reading layers as blocks of rows).

The names are not re-exported here: ``layertap.process.postprocess`` stays the module (``lt.postprocess`` is the
function)."""
