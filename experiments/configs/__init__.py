"""Experiment configs: ``default.py`` (the base) and one file per DST method."""
