"""Training: the driver that launches Ray Train workers, and the per-rank DeepSpeed loop they run."""
