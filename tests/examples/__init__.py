"""Worked examples of docs/extending.md: one subclass per family, each adding one knob, each run from a tiny config
in this folder that names it by import path (``tests/test_extending_examples.py`` runs them)."""
