"""Gradient-based learners: one inner loop (inner_loop.py) and the algorithms that specialise it."""
