"""Error types for bad input a user can fix, importable without torch (the CLI catches them)."""


class WeightsError(RuntimeError):
    """Pretrained weights that were asked for cannot be had; never fall back silently."""
