"""Serving a run's model with MLflow: ``log`` logs it into the run (the few-shot classifier as a pyfunc over the
checkpoint, other networks as torch.export programs), ``fewshot`` is the pyfunc (its request and answer format),
``model_code`` the file MLflow runs to load it."""
