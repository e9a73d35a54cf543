"""Sequence learners: a network reads the support set as a sequence (SNAIL) instead of adapting."""
