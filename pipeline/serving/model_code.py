"""MLflow's "models from code" file of the few-shot classifier: copied into each logged model and run when it is
loaded, instead of unpickling a Python object (see metatrain.pipeline.serving.fewshot)."""

import mlflow.models

from metatrain.pipeline.serving.fewshot import FewShotClassifier

mlflow.models.set_model(FewShotClassifier())
