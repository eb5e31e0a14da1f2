"""Extraction: layer names and aliases (:mod:`.layers`, :mod:`.aliases`), activation layouts
(:mod:`.layouts`), reducers (:mod:`.reducers`), the traced tap graph and BatchNorm folding (:mod:`.graph`),
the planner (:mod:`.planning`) and the batch loop that streams a run to the store (:mod:`.pipeline`)."""
