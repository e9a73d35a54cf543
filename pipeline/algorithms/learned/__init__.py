"""Learned update rules: the LSTM meta-learner of Ravi & Larochelle (meta_lstm) and the coordinate-wise LSTM
optimizer of Andrychowicz et al. (l2l_gd: its truncated unroll and meta-gradient; not yet an algorithm record)."""
