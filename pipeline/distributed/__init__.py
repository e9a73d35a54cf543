"""The Ray runtime: the engine, its actors (thin shells over TaskWorkerCore and ParameterServerCore), the
gradient tree and the trainer that drives the engine."""
