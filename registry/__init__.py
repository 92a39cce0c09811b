"""Registry: promotion of fold models and ensemble inference."""
