"""Sharding a job over processes, GPUs and Slurm array tasks: :mod:`.spec` (which shard a process takes),
:mod:`.merge` (shard runs into one run), :mod:`.slurm` (sbatch scripts) and :mod:`.launch` (one process per
device). A shard is an ordinary extraction of a slice of the stimuli, and the shards merge into one run."""
