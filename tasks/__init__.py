"""Thin Prefect tasks: each loads the catalog, calls one conceptflow stage, returns its manifest."""
