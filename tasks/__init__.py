"""Thin Prefect tasks: each runs one stage-table row for one item and returns its manifest summary."""
