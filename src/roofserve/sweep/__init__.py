"""Ladders of server configs: load, validate, run each step, alternate served and in-process."""
