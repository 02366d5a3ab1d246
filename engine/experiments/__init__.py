"""Experiments: the digits toy harness that compares Dispersive Loss settings end to end (command: engine/toy.py).

settings (DispSetting, ToyConfig), classifier (the FD feature space and the real digits), runs (training
through engine/train.py), scoring (sampling, FD, class accuracy, probe, dispersion), report (tables, PNG),
toy (prepare, run_compare, run_sweep, run_study).
"""
