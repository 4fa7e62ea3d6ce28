"""Inspection methods: look at the network itself, its weights or what excites it over a data set."""
