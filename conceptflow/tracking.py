"""Where the MLflow tracking store is, without importing MLflow (cheap checks import this)."""

from __future__ import annotations

import os
from pathlib import Path


def tracking_uri(project_root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's SQLite file (absolute path)."""
    configured = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if configured:
        return normalise_database_uri(configured)
    return f"sqlite:///{Path(project_root).resolve() / 'mlruns.db'}"


def normalise_database_uri(uri: str) -> str:
    """Pin ``postgresql://`` to psycopg2 when psycopg 3 is absent.

    SQLAlchemy 2.1 made psycopg 3 the default PostgreSQL driver; this project ships
    psycopg2-binary, so a plain ``postgresql://`` URI would fail with "No module named psycopg".
    """
    if uri.startswith("postgresql://"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            return "postgresql+psycopg2://" + uri[len("postgresql://"):]
    return uri
