"""One exception family for user-facing errors.

A ``ConceptflowError`` message names the file or field that is wrong and says how to fix it;
the CLI prints it without a traceback and exits non-zero.
"""


class ConceptflowError(Exception):
    """A problem the user can fix: bad catalog, bad image, unknown concept, missing model."""


class CatalogError(ConceptflowError):
    """The catalog file is missing, malformed or inconsistent."""


class DataError(ConceptflowError):
    """An input image or dataset cannot be used."""


class ModelUnavailableError(ConceptflowError):
    """Weights or code for a requested model cannot be found or loaded."""


class RegistryError(ConceptflowError):
    """A stage output or registry entry cannot be logged, found or read (MLflow)."""
