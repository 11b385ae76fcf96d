"""Circuits and cluster specialization of the model being trained, computed by a Ray actor beside training, or
attribution on the training ranks themselves (`circuits.attribution_on: ranks`)."""
