"""Kill trials: `kill -9` a running `conceptflow run` at random moments in each stage, rerun, check.

Each trial starts a fresh copy of a tiny project (embedded:tiny-sd; an ED-LoRA and a
ConceptFlow-S concept, one combination; see ``tiny_catalog``), starts `conceptflow run` in its
own process group, waits until the trial's target stage is seen working (its staging folder
under data/, DVC's lock for the record step, the MLflow store for registration), waits a random
fraction of a second more (seeded RNG) and kills the whole group with SIGKILL. Targets go round
the stages in a seeded shuffled order, so the kill moments spread over every stage. Then it
reruns `conceptflow run` to completion and checks:

- the rerun finishes (exit 0) and no process of the killed run is left;
- every manifest under data/ matches its folder's md5, every .safetensors loads, and no staging
  folder or atomic-write temporary is left anywhere under data/ or .cache/;
- `dvc status` is clean;
- the registry holds each concept and the combination exactly once: one version per model, with
  ``champion`` on it (the same content registered once: no duplicate, nothing missing);
- the adapters' and the fused model's .safetensors files have the same md5s as an uninterrupted
  reference run's (same inputs, same bytes).

Runs use one Prefect server started for the benchmark (``flows.server.prefect_server``; the
kills do not reach it), so no run waits for an ephemeral server to start (``--ephemeral``: they
do). The reference run (a fresh project, never killed) is made first. Prints one line per trial
and, last, ``kill trials recovered = k/n``. Not part of CI: real processes, ~1-2 min a trial.

    OMP_NUM_THREADS=1 python benchmarks/kill_trials.py --trials 10 --seed 0 [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # flows/ (the Prefect server launcher)
CLI = [sys.executable, "-m", "conceptflow.cli"]
CONCEPTS = (("zigzag_star", "star", "edlora"), ("quartered_heart", "heart", "conceptflow_s"))
COMBO = "zigzag_star+quartered_heart"
PREFECT_API_URL = ""  # the benchmark's Prefect server (main): no ephemeral server start per run
TARGETS = ("ingest", "mask", "train", "fuse", "generate", "evaluate", "report", "record", "register")


def tiny_catalog(steps: int = 6) -> dict:
    concepts = {name: {"class_word": word, "images": f"photos/{name}",
                       "train": {"method": method, "steps": steps, "checkpoint_every": max(1, steps // 2)}}
                for name, word, method in CONCEPTS}
    return {"project": "kill-trials", "base_model": "embedded:tiny-sd", "device": "cpu", "dtype": "float32",
            "resolution": 64, "seed": 0, "concepts": concepts,
            "combinations": {COMBO: {"concepts": [name for name, _, _ in CONCEPTS],
                                     "prompts": ["a <zigzag_star> and a <quartered_heart>"], "seeds": [0, 1]}},
            "mask": {"backend": "auto"}, "fuse": {"method": "average"},
            "generate": {"sampler": "fused", "steps": 4, "batch_size": 1}, "evaluate": {}}


def make_project(folder: Path, steps: int = 6) -> Path:
    """A fresh git repository holding the tiny catalog, its photos and dvc.yaml."""
    import yaml

    folder.mkdir(parents=True)
    for name, _, _ in CONCEPTS:
        photos = folder / "photos" / name
        photos.mkdir(parents=True)
        for stem in ("00", "01", "02"):
            for suffix in (".png", ".txt"):
                shutil.copy(ROOT / "assets" / "toy-concepts" / name / f"{stem}{suffix}", photos)
    shutil.copy(ROOT / "dvc.yaml", folder / "dvc.yaml")
    (folder / "catalog.yaml").write_text(yaml.safe_dump(tiny_catalog(steps), sort_keys=False))
    (folder / ".gitignore").write_text("data/\nmlruns.db\nmlartifacts/\n.dvc-remote/\n.prefect/\n.cache/\n"
                                       ".conceptflow/\n")
    for command in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"]):
        subprocess.run(["git", *command], cwd=folder, check=True)
    return folder


def _env(project: Path, tag: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PREFECT_HOME": str(project / ".prefect"),
           "KILL_TRIAL": tag}
    env.pop("MLFLOW_TRACKING_URI", None)
    if PREFECT_API_URL:
        env["PREFECT_API_URL"] = PREFECT_API_URL
    else:
        env.pop("PREFECT_API_URL", None)
    return env


def run_to_completion(project: Path, tag: str, timeout_s: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "run"], cwd=project, env=_env(project, tag), capture_output=True, text=True,
                          timeout=timeout_s)


def _working(project: Path) -> set[str]:
    """The stages seen at work right now (their staging folders, DVC's lock, the MLflow store)."""
    seen = set()
    data = project / "data"
    patterns = {"ingest": ["concepts/*/.images.*"], "mask": ["concepts/*/.masks.*"], "train": ["adapters/.*"],
                "fuse": ["fused/.*"], "generate": ["generated/.*"], "evaluate": ["metrics/.*"], "report": [".report.*"]}
    for name, globs in patterns.items():
        if any(any(True for _ in data.glob(pattern)) for pattern in globs):
            seen.add(name)
    if (project / ".dvc" / "tmp" / "lock").exists() or (project / "dvc.lock").exists():
        seen.add("record")
    if (project / "mlruns.db").exists() or any(True for _ in project.glob(".mlruns.db.*")):
        seen.add("register")
    return seen


def _own_processes(tag: str) -> list[int]:
    """Pids of live processes started for this trial (their environment carries KILL_TRIAL=tag)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"KILL_TRIAL={tag}".encode() in environ:
            found.append(int(entry.name))
    return found


def kill_during(project: Path, target: str, rng: random.Random, tag: str, timeout_s: float = 900) -> dict:
    """Start `conceptflow run`, SIGKILL its process group once ``target`` is at work (+ a random delay)."""
    process = subprocess.Popen([*CLI, "run"], cwd=project, env=_env(project, tag), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    started, seen_at, delay = time.monotonic(), None, rng.uniform(0.0, 1.5)
    while process.poll() is None and time.monotonic() - started < timeout_s:
        # a stage too quick to be seen at work counts as seen once a later one is
        if seen_at is None and any(TARGETS.index(name) >= TARGETS.index(target) for name in _working(project)):
            seen_at = time.monotonic()
        if seen_at is not None and time.monotonic() - seen_at >= delay:
            break
        time.sleep(0.05)
    finished_first = process.poll() is not None
    if not finished_first:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(0.5)
    leftovers = _own_processes(tag)  # e.g. a server started in its own session
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return {"target": target, "killed_at_s": round(time.monotonic() - started, 1), "seen": seen_at is not None,
            "finished_before_kill": finished_first, "stages_seen": sorted(_working(project)),
            "leftover_processes": len(leftovers)}


def _registry(project: Path) -> dict[str, list[tuple[str, str, list[str]]]]:
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    models = {}
    for model in client.search_registered_models():
        versions = client.search_model_versions(f"name = '{model.name}'")
        try:  # search results do not carry aliases
            champion = client.get_model_version_by_alias(model.name, "champion").version
        except Exception:  # noqa: BLE001 - no champion
            champion = None
        models[model.name] = sorted(((v.version, v.tags.get("artifact.md5", ""),
                                      ["champion"] if v.version == champion else []) for v in versions),
                                    key=lambda row: int(row[0]))
    return models


def check(project: Path, reference: dict | None) -> list[str]:
    """Every problem found in a finished project (empty: recovered)."""
    from safetensors import safe_open

    from conceptflow.fileio import STAGING_DIR, STAGING_FILE, directory_md5
    from conceptflow.lineage import dvc_status_clean
    from conceptflow.manifest import Manifest

    problems = []
    for manifest_path in sorted((project / "data").rglob(".manifest.json")):
        manifest = Manifest.load(manifest_path)
        if directory_md5(manifest_path.parent) != manifest.md5:
            problems.append(f"{manifest_path.parent} does not match its manifest's md5")
    for path in sorted((project / "data").rglob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as handle:
                for key in handle.keys():
                    handle.get_tensor(key)
        except Exception as error:  # noqa: BLE001 - any failure is a corrupt file
            problems.append(f"{path} does not load: {error}")
    for top in ("data", ".cache"):
        for path in (project / top).rglob(".*"):
            if (path.is_dir() and STAGING_DIR.match(path.name)) or (path.is_file() and STAGING_FILE.match(path.name)
                                                                     and path.name != ".manifest.json"):
                problems.append(f"leftover staging {path.relative_to(project)}")
    if not dvc_status_clean(project):
        problems.append("dvc status is not clean")
    models = _registry(project)
    expected = [f"concept.{name}" for name, _, _ in CONCEPTS] + [f"combo.{COMBO}"]
    for name in expected:
        versions = models.get(name, [])
        if not versions:
            problems.append(f"{name} is not registered")
            continue
        md5s = [md5 for _, md5, _ in versions]
        if len(set(md5s)) != len(md5s):
            problems.append(f"{name}: the same content registered twice: {versions}")
        if len(versions) != 1:
            problems.append(f"{name}: {len(versions)} versions, expected 1: {versions}")
        if not any("champion" in aliases for _, _, aliases in versions):
            problems.append(f"{name}: no champion")
    if reference is not None:
        weights = weight_md5s(project)
        changed = sorted(path for path in set(weights) | set(reference) if weights.get(path) != reference.get(path))
        if changed:
            problems.append(f"weights differ from the uninterrupted run's: {changed}")
    extra = sorted(set(models) - set(expected))
    if extra:
        problems.append(f"unexpected registered models {extra}")
    return problems


def weight_md5s(project: Path) -> dict[str, str]:
    """{relative path: md5} of the adapters' and fused models' .safetensors files. (The folders'
    own md5s hold the project's location: ingest.json records each photo's absolute path.)"""
    from conceptflow.fileio import file_md5

    data = project / "data"
    return {path.relative_to(data).as_posix(): file_md5(path) for top in ("adapters", "fused")
            for path in sorted((data / top).rglob("*.safetensors"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6, help="training steps per concept")
    parser.add_argument("--workdir", type=Path, default=None, help="kept (default: a temporary folder, removed)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="an uninterrupted run's finished project to compare with (default: run one first)")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"stages to kill in, comma-separated (default: all: {','.join(TARGETS)})")
    parser.add_argument("--ephemeral", action="store_true",
                        help="let every run start its own ephemeral Prefect server (default: one shared server)")
    args = parser.parse_args(argv)
    if args.ephemeral:
        return trials(args)
    from flows.server import prefect_server

    global PREFECT_API_URL
    with prefect_server() as api_url:
        PREFECT_API_URL = api_url
        return trials(args)


def trials(args) -> int:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kill-trials-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    began = time.monotonic()

    reference_project = args.reference
    if reference_project is None:
        reference_project = make_project(workdir / "reference", args.steps)
        done = run_to_completion(reference_project, f"{os.getpid()}-reference")
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-4000:], sep="\n")
            raise SystemExit("the uninterrupted reference run failed")
    reference = weight_md5s(reference_project)
    problems = check(reference_project, None)
    print(f"reference run: {time.monotonic() - began:.0f} s, problems: {problems or 'none'}", flush=True)

    order: list[str] = []
    while len(order) < args.trials:
        shuffled = [name for name in TARGETS if name in args.targets.split(",")]
        if not shuffled:
            raise SystemExit(f"--targets names none of {TARGETS}")
        rng.shuffle(shuffled)
        order += shuffled
    recovered = 0
    for index, target in enumerate(order[:args.trials]):
        trial_began = time.monotonic()
        project = make_project(workdir / f"trial-{index:02d}", args.steps)
        tag = f"{os.getpid()}-{index}"
        killed = kill_during(project, target, rng, tag)
        rerun = run_to_completion(project, tag)
        problems = [] if rerun.returncode == 0 else [f"rerun exited {rerun.returncode}: {rerun.stderr[-600:]}"]
        problems += check(project, reference) if rerun.returncode == 0 else []
        if killed["leftover_processes"]:
            problems.append(f"{killed['leftover_processes']} process(es) of the killed run outlived it")
        recovered += not problems
        print(f"trial {index}: target {target}, killed at {killed['killed_at_s']} s "
              f"({'finished before the kill' if killed['finished_before_kill'] else 'stages seen ' + ','.join(killed['stages_seen'])})"
              f", rerun {time.monotonic() - trial_began:.0f} s total: "
              f"{'recovered' if not problems else 'NOT recovered: ' + '; '.join(problems)}", flush=True)
        if not problems and args.workdir is None:
            shutil.rmtree(project, ignore_errors=True)
    print(f"{args.trials} trials in {time.monotonic() - began:.0f} s (seed {args.seed}, {args.steps} steps)")
    if args.workdir is None and recovered == args.trials:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"kill trials recovered = {recovered}/{args.trials}")
    return 0 if recovered == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
