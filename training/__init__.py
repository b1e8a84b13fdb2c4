"""Training side: annotated archives, synthetic data, teacher, training loop, evaluation."""
