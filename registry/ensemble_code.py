"""The ensemble pyfunc as code (MLflow models-from-code): logged as a file, never pickled."""

from mlflow.models import set_model

from registry.ensemble import EnsembleModel

set_model(EnsembleModel())
