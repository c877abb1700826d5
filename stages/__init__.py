"""The transfer-learning study's DVC pipeline.

The six stage modules, each a thin entry point (`python -m stages.<name>`, dvc.yaml's cmd), over
the library they share; stages/study/, the tools that run the pipeline's experiments and read
them back, which no stage imports.
"""
