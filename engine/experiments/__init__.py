"""Experiments: the digits toy harness that compares Dispersive Loss settings end to end."""
