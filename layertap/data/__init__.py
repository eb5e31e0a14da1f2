"""Stimuli: what a run reads. Image folders and lists (:mod:`.images`), movies (:mod:`.video`),
stimulus arrays (:mod:`.arrays`), and :func:`~layertap.data.stimuli.open_stimuli`, which picks one."""
