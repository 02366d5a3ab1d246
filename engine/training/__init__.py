"""Training: the trainer, its run config, DeepSpeed set-up, checkpoints, EMA, metrics, process groups."""
