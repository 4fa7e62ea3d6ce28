"""Optimization methods: images made by optimizing them through a frozen network."""
