"""Merging quality benchmark on a real model: data and expert preparation (`prepare`) and accuracy (`evaluate`).

Everything comes from package registries (PyPI, npm, Debian), so it runs where nothing else can be reached.
"""
