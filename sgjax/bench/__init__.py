"""The benchmark: one runner (``programs.run_vmapped``: runs vmapped in one compiled program,
sharded over the devices) and one report (``report``: table.md, benchmark.json; ``plots``).
The experiment tables (``grid``: the paper's Table 1, ``rnn_table``: Table 2, ``update_prob``:
stochastic updates, ``timing``: loop timings) share the runner, the mode names and markdown
tables of ``names`` and the architecture facts of ``sgjax.training.architecture``."""
