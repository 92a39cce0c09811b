"""The registry's only MLflow-writing module: registered models, versions, their tags, aliases
(and the lookups of the version behind a models:/ URI).

Run logging (params, artifacts, the pyfunc model) goes through training.tracking.RunTracker.
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)


def ensure_registered_model(name: str, description: str, tags: dict[str, str]) -> None:
    """Create the registered model once; later calls leave it (and its description) alone."""
    client = MlflowClient()
    try:
        client.create_registered_model(name, tags=tags, description=description)
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def find_version(name: str, tags: dict[str, str]) -> ModelVersion | None:
    """The newest version of `name` carrying all `tags`: the idempotency lookup."""
    where = " and ".join([f"name = '{name}'"] + [f"tags.{k} = '{v}'" for k, v in tags.items()])
    versions = MlflowClient().search_model_versions(where, order_by=["version_number DESC"])
    return versions[0] if versions else None


def register_version(model_uri: str, name: str, tags: dict[str, Any]) -> ModelVersion:
    """A new version of `name` from a LoggedModel URI (models:/m-...). mlflow.register_model
    links the version to the LoggedModel and its source run."""
    return mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})


def set_version_tags(name: str, version: str | int, tags: dict[str, Any]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))


def set_alias(name: str, alias: str, version: str | int) -> None:
    """Point `alias` at `version` (moves it if it pointed elsewhere)."""
    MlflowClient().set_registered_model_alias(name, alias, str(version))
    log.info("alias %s@%s -> version %s", name, alias, version)


def set_version_description(name: str, version: str | int, description: str) -> None:
    """The version's one-line description (shown on its page and in the versions list)."""
    MlflowClient().update_model_version(name, str(version), description=description)


def point_fold_aliases(name: str, prefix: str, versions: dict[int, str]) -> None:
    """Aliases `<prefix>-fold-<n>` on `name` pointing at `versions[n]`; aliases with that
    prefix whose fold is no longer in `versions` are deleted, so they always describe one
    ensemble's members."""
    client = MlflowClient()
    wanted = {f"{prefix}-fold-{fold}": str(version) for fold, version in versions.items()}
    for alias in client.get_registered_model(name).aliases:
        if alias.startswith(f"{prefix}-fold-") and alias not in wanted:
            client.delete_registered_model_alias(name, alias)
    for alias, version in wanted.items():
        client.set_registered_model_alias(name, alias, version)


def model_version(model_uri: str) -> str:
    """The registry version behind models:/name@alias or models:/name/version, else ''."""
    if not model_uri.startswith("models:/"):
        return ""
    reference = model_uri[len("models:/") :]
    if "@" in reference:
        name, alias = reference.split("@", 1)
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
    if "/" in reference:
        return reference.rsplit("/", 1)[1]
    return ""  # models:/m-<id>: a logged model, not a registry version


def pinned_model_uri(model_uri: str) -> str:
    """models:/name@alias as the version it points at now (the alias may move later)."""
    if model_uri.startswith("models:/") and "@" in model_uri:
        name = model_uri[len("models:/") :].split("@", 1)[0]
        return f"models:/{name}/{model_version(model_uri)}"
    return model_uri
