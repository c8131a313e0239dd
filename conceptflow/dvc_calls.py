"""``python -m conceptflow.dvc_calls ROOT CALL...``: DVC calls made in one process, through DVC's
Python API (``dvc.repo.Repo``), in the repository at ROOT (the working folder: DVC resolves
paths from it, which is why this is a process of its own and not a thread of a run).

Calls, in the order given: ``default-remote`` (add the local ``.dvc-remote`` folder as the default
remote when none is configured; what ``dvc remote add --default`` does), ``commit`` (``dvc commit
--force``: every dvc.yaml stage's current outputs into dvc.lock), ``push`` (``dvc push``) and
``status`` (``dvc status``). Prints one JSON object, {call: result}; on a DVC error, the failing
call and DVC's message on stderr and exit code 1. One process instead of one per call saves
starting an interpreter and importing DVC three times a run (~2.5 s).
"""

from __future__ import annotations

import json
import os
import sys

DEFAULT_REMOTE = "local"
DEFAULT_REMOTE_DIR = ".dvc-remote"


def _default_remote(repo) -> bool:
    if repo.config.get("remote"):
        return False
    with repo.config.edit() as config:
        config["remote"][DEFAULT_REMOTE] = {"url": DEFAULT_REMOTE_DIR}
        config["core"]["remote"] = DEFAULT_REMOTE
    return True


def _commit(repo) -> None:
    repo.commit(None, force=True)  # every stage (no target), without asking


CALLS = {"default-remote": _default_remote,
         "commit": _commit,
         "push": lambda repo: repo.push(),
         "status": lambda repo: repo.status()}


def main(argv: list[str]) -> int:
    root, *calls = argv
    unknown = [call for call in calls if call not in CALLS]
    if unknown:
        print(f"unknown DVC call(s) {unknown}; known: {sorted(CALLS)}", file=sys.stderr)
        return 2
    os.chdir(root)
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    results = {}
    for call in calls:
        try:
            with Repo(".") as repo:  # reopened per call: a config edit is seen by the next call
                results[call] = CALLS[call](repo)
        except DvcException as error:
            cause = f": {error.__cause__}" if error.__cause__ else ""
            print(f"dvc {call}: {error}{cause}", file=sys.stderr)
            return 1
    print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
