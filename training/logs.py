"""Console logging set-up shared by the entry points."""

from __future__ import annotations

import logging
import warnings


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # MLflow and Alembic are chatty at INFO about their own bookkeeping.
    for noisy in ("alembic", "mlflow.store", "mlflow.tracking", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
