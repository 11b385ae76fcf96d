"""Circuits and cluster specialization of the model being trained, computed by a Ray actor beside training."""
