"""Training: data, model, loop, metrics, tracking and the train / k-fold jobs."""
