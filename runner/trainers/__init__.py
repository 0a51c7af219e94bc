"""Trainers: the derived (geometry-first) trainer and the baselines it is tested against."""
