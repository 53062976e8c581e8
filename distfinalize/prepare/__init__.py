"""Prepare: what every rank knows before reading a byte (the source opened, config.json, names mapped, the dtype
chosen).

Runs on: all ranks.
"""
