"""A team tracking server on one machine: PostgreSQL + `mlflow server` with proxied artifacts.

It imports nothing from training/, tuning/ or registry/ (the jobs only see the URIs it
prints), so the one-way flow training <- tuning/registry stays as it is."""
