"""Training: the jitted step, the host loop, the train state, checkpoints and preemption."""
