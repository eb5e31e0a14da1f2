"""Analysis of stored runs (a stage after the Store; it never reaches back into extraction).

Modules: :mod:`.rdms` (RDMs, crossnobis distances), :mod:`.compare` (comparing RDMs),
:mod:`.alignment` (CKA, HSIC), :mod:`.similarity` (layer x layer similarity, layers against a
reference), :mod:`.matrices` (reading reference/response matrices), :mod:`.rsatoolbox` (hand-off to
rsatoolbox), :mod:`.rows` (row-block access), :mod:`.results` (result objects), :mod:`.plots`
(figures) and :mod:`.report` (the HTML run report).

    import layertap as lt
    r = lt.analysis.rdm(run["avgpool"][:], metric="correlation")
"""

from layertap.analysis.alignment import cka, hsic
from layertap.analysis.compare import RDM_COMPARISONS, compare_rdms, kendall_tau_a, rank_average
from layertap.analysis.matrices import load_matrix
from layertap.analysis.rdms import METRICS, crossnobis_rdm, is_rdm, rdm, rdm_to_disk, upper_triangle
from layertap.analysis.rsatoolbox import rdms_to_rsatoolbox, to_rsatoolbox
from layertap.analysis.similarity import METHODS, compare_to_reference, layer_similarity, select_layers

__all__ = ["cka", "compare_rdms", "compare_to_reference", "crossnobis_rdm", "hsic", "is_rdm", "kendall_tau_a", "layer_similarity", "load_matrix", "METHODS", "METRICS", "rank_average", "rdm", "RDM_COMPARISONS", "rdm_to_disk", "rdms_to_rsatoolbox", "select_layers", "to_rsatoolbox", "upper_triangle"]
