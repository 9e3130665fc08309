"""The benchmark: ``programs`` (runs vmapped in one sharded program, step timing), ``report``,
``plots``, and the tables ``grid`` (Table 1), ``rnn_table`` (Table 2) and ``update_prob``."""
