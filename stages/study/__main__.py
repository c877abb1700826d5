"""python -m stages.study: the grid (grid.py)."""
from stages.pipeline.errors import run_stage
from stages.study.grid import main

run_stage(main)
