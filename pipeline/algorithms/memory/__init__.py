"""Memory-augmented learners: MANN (NTM addressing, LRUA) and Kaiser et al.'s key-value memory."""
