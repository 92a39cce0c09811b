"""Tuning: Optuna studies over the training job."""
