"""The study, run over the DVC pipeline: no stage imports it (tests/test_dag.py checks).

    python -m stages.study            # grid.py: the model × strategy × seed grid as queued DVC experiments
    python -m stages.study.report     # report.py: the results table and charts, from dvc exp show
    python -m stages.study.protocols readme   # protocols.py: a named protocol's -S flags

experiments.py reads DVC's state, table.py tables it with pandas, charts.py draws the table,
remotes.py shares a study across machines, options.py holds the command-line lists.
"""
