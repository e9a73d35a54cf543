"""What a user runs: train, evaluate, predict, retrain, study. Jobs drive the distributed engine."""
