"""Cairn: open, self-hosted machine-learning pipelines with the Azure ML SDK v1 vocabulary.

Everything public is importable from here; modules load on first use so ``import cairn`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC: dict[str, str] = {
    "Workspace": "cairn.client.workspace",
    "Datastore": "cairn.client.datastore",
    "ComputeTarget": "cairn.client.compute",
    "LocalCompute": "cairn.client.compute",
    "RayCompute": "cairn.client.compute",
    "Environment": "cairn.client.environment",
    "RunConfiguration": "cairn.client.environment",
    "CondaDependencies": "cairn.environments.conda",
    "PipelineData": "cairn.data.pipeline_data",
    "Dataset": "cairn.client.dataset",
    "OutputFileDatasetConfig": "cairn.data.output_dataset",
    "FileDataset": "cairn.client.dataset",
    "TabularDataset": "cairn.client.dataset",
    "PythonScriptStep": "cairn.client.steps",
    "Pipeline": "cairn.client.pipeline",
    "Experiment": "cairn.client.experiment",
    "Run": "cairn.client.run",
    "PipelineRun": "cairn.client.run",
    "StepRun": "cairn.client.run",
    "OfflineRun": "cairn.client.run",
    "Status": "cairn.core.status",
    "CairnError": "cairn.core.errors",
    "UserInputError": "cairn.core.errors",
    "PipelineValidationError": "cairn.core.errors",
    "WorkspaceNotFoundError": "cairn.core.errors",
    "PathNotFoundError": "cairn.core.errors",
    "RunFailedError": "cairn.core.errors",
    "RunTimeoutError": "cairn.core.errors",
    "SnapshotTooLargeError": "cairn.core.errors",
    "NotFoundError": "cairn.core.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'cairn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])

