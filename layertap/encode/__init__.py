"""Encoding models: score every stored layer of a run against brain or behavioural responses.

    import layertap as lt
    scores = lt.encode(run, "betas.h5", stimuli="stimulus_ids.tsv", folds=5)   # a callable module
    scores.best_layer(roi="V4"); scores.plot("profile.png"); scores.save("./scores")

Stages: :mod:`.responses` (reading and matching by stimulus id), :mod:`.ridge` (himalaya's ridge
with per-target alphas), :mod:`.ceiling` (split-half / NCSNR noise ceilings, RSA ceiling bounds),
:mod:`.scores` (the tidy result), :mod:`.rsa` (layer RDMs against subjects' RDMs). Reads a finished
run (a Store) only; never reaches back into extraction. Needs ``pip install 'layertap[encode]'``.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from layertap.encode.ceiling import ncsnr, nsd_noise_ceiling, rdm_noise_ceiling, reliability, split_half_reliability
from layertap.encode.encoding import encode
from layertap.encode.responses import Responses, match_ids, prepare_responses
from layertap.encode.scores import EncodingScores

__all__ = [
    "EncodingScores",
    "Responses",
    "encode",
    "match_ids",
    "ncsnr",
    "nsd_noise_ceiling",
    "prepare_responses",
    "rdm_noise_ceiling",
    "reliability",
    "split_half_reliability",
]


class _CallableModule(types.ModuleType):
    """``layertap.encode`` is this package and also the function: ``lt.encode(run, responses, ...)``."""

    def __call__(self, *args: Any, **kwargs: Any) -> EncodingScores:
        return encode(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
