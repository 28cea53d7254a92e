"""Hyper-parameter sweeps across the pool (``%%lepton --sweep``), on Optuna: space.py reads the
options, driver.py runs the trials, studies.py keeps and reads back the study, durations.py
estimates how long a trial takes (longest first)."""
