"""Subcommands besides finalize: inspect, verify."""
