"""Find the base model a registered version was trained on, from what registration recorded.

Registration records the catalog's ``base_model`` id, its content hash (``base_model_hash``,
``conceptflow.models.loading.model_fingerprint``: a hash of a local folder's weight and config
files, ``hub:<id>`` for a hub id) and, for a local folder inside the project, its path relative
to the project root (``base_model_path``, e.g. ``assets/toy-base``, which a clean checkout has
because it is committed). Here that becomes something ``load_base_pipeline`` can load:

* a recorded project path: ``<project root>/<base_model_path>``; the project root is the one
  given, else ``$CONCEPTFLOW_PROJECT``, else the git checkout around the current folder, else
  the checkout this package is installed from (an editable install);
* ``embedded:<name>``: built into the local cache as the pipeline builds it;
* anything else: a hub id (it must be in the hub cache when offline) or an absolute folder.

The content hash is then checked: a folder whose files differ from the ones the version was
trained on is refused (``verify=False`` skips the check, for a base knowingly replaced).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conceptflow.errors import ModelUnavailableError
from conceptflow.models.loading import model_fingerprint, resolve_model_source

PROJECT_ENV = "CONCEPTFLOW_PROJECT"
PACKAGE_CHECKOUT = Path(__file__).resolve().parents[2]  # the folder holding conceptflow/


def git_toplevel(folder: Path) -> Path | None:
    try:
        result = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=folder, capture_output=True, text=True)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return Path(result.stdout.strip()) if result.returncode == 0 and result.stdout.strip() else None


def project_roots(project: Path | str | None = None) -> list[Path]:
    """Where a project-relative base path is looked for, in order (see the module docstring)."""
    if project is not None:
        return [Path(project).resolve()]
    roots = []
    if os.environ.get(PROJECT_ENV, "").strip():
        roots.append(Path(os.environ[PROJECT_ENV]).resolve())
    around_cwd = git_toplevel(Path.cwd())
    roots += [root for root in (around_cwd, PACKAGE_CHECKOUT) if root is not None]
    return list(dict.fromkeys(roots))


def project_relative_path(source: str, root: Path) -> str | None:
    """``source`` (a resolved local folder) relative to ``root`` when inside it, else None."""
    path = Path(source)
    if not path.is_dir():
        return None
    try:
        return path.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return None


def resolve_base_model(base_model: str, base_model_hash: str | None, base_model_path: str | None = None,
                       project: Path | str | None = None, verify: bool = True) -> str:
    """The loadable source (folder or id) of a recorded base model, its content hash checked."""
    if base_model_path:
        roots = project_roots(project)
        found = next((root / base_model_path for root in roots if (root / base_model_path).is_dir()), None)
        if found is None:
            raise ModelUnavailableError(
                f"the base model was recorded as the project folder {base_model_path!r} ({base_model!r}); it is not "
                f"under {', '.join(map(str, roots)) or 'any project root'}: run from a checkout of the project "
                f"(or pass --project / set {PROJECT_ENV})")
        source = str(found.resolve())
    else:
        source = resolve_model_source(base_model)  # an embedded model is built into the local cache here
    if verify and base_model_hash:
        actual = model_fingerprint(source)
        if actual != base_model_hash:
            raise ModelUnavailableError(
                f"base model {source!r} has content hash {actual}, but the version was trained on {base_model!r} "
                f"with hash {base_model_hash}: check out the revision that made it, or skip the check knowingly "
                "(--no-verify-base)")
    return source
