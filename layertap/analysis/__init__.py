"""Analysis of stored runs: RDMs, RDM comparisons, CKA, layer x layer similarity (:mod:`.similarity`),
result objects (:mod:`.results`), figures (:mod:`.plots`) and the HTML run report (:mod:`.report`).

    import layertap as lt
    r = lt.analysis.rdm(run["avgpool"][:], metric="correlation")
"""

from layertap.analysis.similarity import (
    METHODS,
    METRICS,
    RDM_COMPARISONS,
    cka,
    compare_rdms,
    compare_to_reference,
    crossnobis_rdm,
    hsic,
    is_rdm,
    kendall_tau_a,
    layer_similarity,
    load_matrix,
    rank_average,
    rdm,
    rdm_to_disk,
    rdms_to_rsatoolbox,
    select_layers,
    to_rsatoolbox,
    upper_triangle,
)

__all__ = ["cka", "compare_rdms", "compare_to_reference", "crossnobis_rdm", "hsic", "is_rdm", "kendall_tau_a", "layer_similarity", "load_matrix", "METHODS", "METRICS", "rank_average", "rdm", "RDM_COMPARISONS", "rdm_to_disk", "rdms_to_rsatoolbox", "select_layers", "to_rsatoolbox", "upper_triangle"]
