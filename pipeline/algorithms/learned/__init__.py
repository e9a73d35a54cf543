"""Learned update rules: the LSTM meta-learner of Ravi & Larochelle (meta_lstm)."""
