"""The file MLflow runs to build a run's compact speech model (MLflow "models from code": nothing is
pickled); `infra.mlflow_model` saves it into each model directory."""

import mlflow

from infra.mlflow_model import CompactSpeechModel

mlflow.models.set_model(CompactSpeechModel())
