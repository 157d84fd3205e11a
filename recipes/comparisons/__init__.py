"""Comparisons of ``python -m recipes.reproduce`` kept in their own modules, one per method.

Each module imports ``Comparison``/``Stage``/``COMPARISONS`` from :mod:`recipes.reproduce` and registers its
entries; :func:`recipes.reproduce.load_comparisons` imports them all on first use.
"""
