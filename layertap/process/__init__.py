"""Post-processing of finished runs: PCA, sparse random projection, feature-map ensembles
(:mod:`.postprocess`). Reads a run, writes a new run; never reaches back into extraction."""
