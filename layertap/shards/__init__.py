"""Sharding a job over processes, GPUs and Slurm array tasks (:mod:`.cluster`); a shard is an ordinary
extraction of a slice of the stimuli, and the shards merge into one run."""
