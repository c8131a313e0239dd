"""The ``conceptflow`` command: one sub-command per stage, ``run`` for the whole catalog.

Stage commands run the library directly (this is what ``dvc repro`` calls); ``run`` runs the
Prefect flow, which calls the same functions and then records the outputs in DVC and MLflow.
User errors print one line naming the file/field and the fix, and exit with status 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import typer

from conceptflow.config import Catalog, load_catalog
from conceptflow.errors import ConceptflowError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
registry_app = typer.Typer(no_args_is_help=True, help="Look concept and combination models up in MLflow.")
app.add_typer(registry_app, name="registry")


@app.callback(help=__doc__.split("\n")[0])
def _tool_defaults() -> None:
    # Before any command imports mlflow or prefect (both read settings on import).
    from conceptflow.tool_env import use_tool_defaults

    use_tool_defaults()

CatalogOption = typer.Option(Path("catalog.yaml"), "--catalog", "-c", help="catalog YAML file")
ForceOption = typer.Option(False, "--force", help="redo the stage even if its output is up to date")


def user_errors(command: Callable) -> Callable:
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ConceptflowError as error:
            typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2)

    return wrapper


def _say(stage: str, name: str, ran: bool, manifest) -> None:
    state = "done" if ran else "up to date"
    typer.echo(f"{stage:9s} {name:24s} {state:10s} {manifest.path} (md5 {manifest.md5[:10]})")


def _project_lock(catalog: Catalog, timeout_s: Optional[float] = None):
    """The project's run lock (conceptflow.locks): one run or stage command per project at a time.
    Default wait: CONCEPTFLOW_LOCK_TIMEOUT seconds (unset: as long as it takes; 0: refuse at once)."""
    from conceptflow.locks import lock_timeout_from_env, run_lock

    return run_lock(catalog.root, timeout_s if timeout_s is not None else lock_timeout_from_env(),
                    say=lambda text: typer.echo(text, err=True))


def _names(all_names: list[str], chosen: Optional[str], what: str) -> list[str]:
    if chosen is None:
        return all_names
    if chosen not in all_names:
        raise ConceptflowError(f"no {what} named {chosen!r} in the catalog; known: {all_names}")
    return [chosen]


def _valid_catalog(catalog_path: Path) -> Catalog:
    """The catalog, loaded and checked before any work (conceptflow.validation): every problem at once."""
    from conceptflow.validation import validate_catalog

    catalog = load_catalog(catalog_path)
    validate_catalog(catalog, catalog_path)
    return catalog


def _concept_stage(stage: str, function, catalog_path: Path, concept: Optional[str], force: bool) -> None:
    # ingest needs neither the base model nor the device: a stage before them keeps working without them.
    catalog = load_catalog(catalog_path) if stage == "ingest" else _valid_catalog(catalog_path)
    with _project_lock(catalog):
        for name in _names([c.name for c in catalog.concepts], concept, "concept"):
            manifest, ran = function(catalog, name, force=force)
            _say(stage, name, ran, manifest)


def _combination_stage(stage: str, function, catalog_path: Path, combination: Optional[str], force: bool, **extra) -> None:
    catalog = _valid_catalog(catalog_path)
    with _project_lock(catalog):
        for name in _names([c.name for c in catalog.combinations], combination, "combination"):
            manifest, ran = function(catalog, name, force=force, **extra)
            _say(stage, name, ran, manifest)


@app.command()
@user_errors
def validate(catalog: Path = CatalogOption):
    """Check the catalog without running anything: fields, names, base model, device, prompt lengths, folders."""
    loaded = _valid_catalog(catalog)
    typer.echo(f"{catalog}: valid ({len(loaded.concepts)} concepts, {len(loaded.combinations)} combinations)")


@app.command()
@user_errors
def ingest(catalog: Path = CatalogOption, concept: Optional[str] = typer.Option(None, help="one concept (default: all)"),
           force: bool = ForceOption):
    """Validate, normalise and de-duplicate the concepts' photos into data/concepts/<name>/images."""
    from conceptflow.stages.ingest import ingest as run

    _concept_stage("ingest", run, catalog, concept, force)


@app.command()
@user_errors
def mask(catalog: Path = CatalogOption, concept: Optional[str] = typer.Option(None), force: bool = ForceOption):
    """Foreground masks of the ingested photos into data/concepts/<name>/masks."""
    from conceptflow.stages.mask import mask as run

    _concept_stage("mask", run, catalog, concept, force)


@app.command()
@user_errors
def train(catalog: Path = CatalogOption, concept: Optional[str] = typer.Option(None), force: bool = ForceOption):
    """Train each concept's adapter (method from the catalog) into data/adapters/<name>."""
    from conceptflow.stages.train import train as run

    _concept_stage("train", run, catalog, concept, force)


@app.command()
@user_errors
def fuse(catalog: Path = CatalogOption, combination: Optional[str] = typer.Option(None), force: bool = ForceOption):
    """Fuse the adapters of each combination into data/fused/<combination>."""
    from conceptflow.stages.fuse import fuse as run

    _combination_stage("fuse", run, catalog, combination, force)


@app.command()
@user_errors
def generate(catalog: Path = CatalogOption, combination: Optional[str] = typer.Option(None),
             sampler: Optional[str] = typer.Option(None, help="fused | conceptflow_m (default: the catalog's)"),
             force: bool = ForceOption):
    """Sample each combination's prompts into data/generated/<combination>."""
    from conceptflow.stages.generate import generate as run

    _combination_stage("generate", run, catalog, combination, force, sampler=sampler)


@app.command()
@user_errors
def evaluate(catalog: Path = CatalogOption, combination: Optional[str] = typer.Option(None), force: bool = ForceOption):
    """Score generated images (CLIP-T, CLIP-I, DINO, ...) into data/metrics/<combination>."""
    from conceptflow.stages.evaluate import evaluate as run

    _combination_stage("evaluate", run, catalog, combination, force)


@app.command()
@user_errors
def report(catalog: Path = CatalogOption, force: bool = ForceOption):
    """Write the HTML report to data/report/index.html."""
    from conceptflow.stages.report import report as run

    loaded = load_catalog(catalog)
    with _project_lock(loaded):
        manifest, ran = run(loaded, force=force)
    _say("report", "index.html", ran, manifest)


@app.command()
@user_errors
def record(catalog: Path = CatalogOption, push: bool = typer.Option(True, help="push to the DVC remote")):
    """Record the current outputs in dvc.lock (dvc commit) and push them to the DVC remote."""
    from conceptflow.lineage import record_outputs

    loaded = load_catalog(catalog)
    root = loaded.root
    with _project_lock(loaded):
        clean = record_outputs(root, push=push)
    typer.echo(f"dvc.lock updated; dvc status clean: {clean}")


@app.command()
@user_errors
def register(catalog: Path = CatalogOption):
    """Log every stage to MLflow and register concept.<name> / combo.<a>+<b> versions with lineage."""
    from conceptflow.stages.register import register as run

    loaded = load_catalog(catalog)
    with _project_lock(loaded):
        lines = run(loaded)
    for line in lines:
        typer.echo(line)


@app.command()
@user_errors
def run(catalog: Path = CatalogOption,
        sampler: Optional[str] = typer.Option(None, help="override the catalog's sampler"),
        runner: str = typer.Option("threads", help="threads | dask (Dask wants a Prefect server: PREFECT_API_URL)"),
        dask_address: Optional[str] = typer.Option(None, help="with --runner dask: an existing cluster's scheduler, "
                                                   "tcp://HOST:PORT (default: a LocalCluster here)"),
        no_shared_fs: bool = typer.Option(False, "--no-shared-fs", help="with --dask-address: the workers share "
                                          "no folder with this project; each works in its own clone and stage "
                                          "inputs and outputs travel by md5 through the default DVC remote"),
        worker_root: Optional[str] = typer.Option(None, help="with --no-shared-fs: the folder, on each worker, "
                                                  "holding its clone (relative: from the worker's working folder; "
                                                  "default conceptflow-worker)"),
        wait: bool = typer.Option(True, "--wait/--no-wait", help="wait for a run or stage command already working "
                                  "on this project (its lock: .conceptflow/run.lock), or refuse at once"),
        wait_timeout: Optional[float] = typer.Option(None, envvar="CONCEPTFLOW_LOCK_TIMEOUT",
                                                     help="seconds to wait for that lock before giving up "
                                                     "(default: no limit)"),
        recheck: bool = typer.Option(False, "--recheck", help="run the flow even when nothing changed since the "
                                     "last complete run (it re-pushes to the DVC remote and re-checks the registry; "
                                     "always so against a Prefect server)")):
    """Run the whole catalog as a Prefect flow: ingest -> ... -> register, report. When nothing changed
    since the last complete run (conceptflow/stages/run_record.py) it says so without starting the flow."""
    from contextlib import nullcontext

    from conceptflow.stages.run_record import catalog_as_recorded, unchanged_summary, write_run_record
    from conceptflow.stages.base import remove_dead_staging_in_project
    from conceptflow.validation import validate_catalog
    from flows.run_server import RunServer, prefect_server_configured  # imports no Prefect

    server_configured = prefect_server_configured()
    # The run's own Prefect server (flows/run_server.py: unless one is configured or Dask workers need
    # one) starts first, so that it is up when the flow needs it; stopped at once when nothing runs.
    server = RunServer() if runner == "threads" and not server_configured else None
    flow_started = False
    try:
        loaded = load_catalog(catalog)
        # Nothing changed since the last complete run: say so without starting the flow, except against
        # a Prefect server (there every run shows as a flow run) or with --recheck.
        shortcut = not recheck and not server_configured
        # Fail fast, before the lock is waited for, on a bad catalog (every problem at once); a catalog
        # file as the last complete run read it is checked only if that run is redone.
        validated = not (shortcut and catalog_as_recorded(loaded, catalog.resolve()))
        if validated:
            validate_catalog(loaded, catalog)
        with _project_lock(loaded, wait_timeout if wait else 0.0):
            remove_dead_staging_in_project(loaded.root)  # killed runs' staging folders
            summary = unchanged_summary(loaded, catalog.resolve(), sampler) if shortcut else None
            if summary is None:
                if not validated:
                    validate_catalog(loaded, catalog)
                from flows.catalog import run_catalog  # Prefect lives in flows/, imported only here

                flow_started = True
                with server.api() if server else nullcontext():
                    summary = run_catalog(str(catalog.resolve()), sampler=sampler, runner=runner,
                                          dask_address=dask_address, no_shared_fs=no_shared_fs,
                                          worker_root=worker_root)
                write_run_record(loaded, catalog.resolve(), sampler, summary)
    finally:
        # After a flow the server stops at exit, once Prefect has flushed its logs and events to it.
        if server is not None and not flow_started:
            server.stop()
    typer.echo(json.dumps(summary, indent=2))


@app.command()
@user_errors
def schedule(catalog: Path = CatalogOption,
             cron: str = typer.Option("0 3 * * 1", help="cron expression (default: Mondays 03:00 UTC)"),
             sampler: Optional[str] = typer.Option(None)):
    """Serve the catalog flow on a cron schedule (needs a Prefect server: PREFECT_API_URL)."""
    _valid_catalog(catalog)
    from flows.schedule import serve_retraining

    serve_retraining(str(catalog.resolve()), cron, sampler)


@app.command("pretrain-toy")
@user_errors
def pretrain_toy(out: Path = typer.Option(Path("assets/toy-base"), help="destination (diffusers folder + card)"),
                 minutes: float = typer.Option(90.0, help="wall-time budget; a rerun resumes from checkpoints"),
                 threads: int = typer.Option(1, help="torch threads (2 on an otherwise idle 2-core machine)")):
    """Pretrain the toy-world base and its evaluators (recogniser, identity encoder) on this CPU."""
    from recipes.toy.build import build_toy_assets  # the one place conceptflow reaches the recipes
    from recipes.toy.pretrain import PretrainConfig

    result = build_toy_assets(out, minutes, PretrainConfig(threads=threads))
    typer.echo(str(result))


@app.command("export")
@user_errors
def export(name: str = typer.Argument(..., help="a concept or a combination of the catalog"),
           format_name: str = typer.Option(..., "--format", "-f",
                                           help="a concept: one of its method's MethodSpec.exporters (edlora: "
                                           "kohya, embedding); a combination: diffusers"),
           out: Path = typer.Option(..., "--out", "-o", help="destination file (a folder for diffusers)"),
           catalog: Path = CatalogOption):
    """Write a trained concept (data/adapters/N) or a fused combination (data/fused/C) for other tools."""
    from conceptflow.exports import export_combination, export_concept
    from conceptflow.layout import Layout

    loaded = load_catalog(catalog)
    layout = Layout(loaded)
    concepts, combinations = [c.name for c in loaded.concepts], [c.name for c in loaded.combinations]
    if name in concepts:
        written = export_concept(layout.adapter(name), format_name, out)
    elif name in combinations:
        written = export_combination(layout.fused(name), format_name, out, loaded.base_model_source)
    else:
        raise ConceptflowError(f"no concept or combination named {name!r} in {catalog}; "
                               f"concepts: {concepts}, combinations: {combinations}")
    typer.echo(f"wrote {written}")


@app.command("export-lycoris", deprecated=True)
@user_errors
def export_lycoris(adapter: Path = typer.Argument(..., help="a trained conceptflow_s concept folder"),
                   output: Path = typer.Argument(..., help="destination .safetensors (LyCORIS/kohya keys)")):
    """Deprecated: use `conceptflow export NAME --format lycoris --out FILE`. Writes a KronA-WED concept
    folder as a LyCORIS LoKr (dora_wd) file for ComfyUI/A1111/kohya."""
    from conceptflow.adapters.concept_io import read_adapter
    from conceptflow.methods import METHODS, get_method

    method = read_adapter(adapter)[1].get("method")
    able = sorted(name for name, spec in METHODS.items() if "lycoris" in spec.exporters)
    if method not in METHODS or "lycoris" not in get_method(method).exporters:
        raise ConceptflowError(f"{adapter} was trained with method {method!r}; only {', '.join(able)} concepts "
                               "export to LyCORIS LoKr files")
    get_method(method).exporter("lycoris")(adapter, output)
    typer.echo(f"wrote {output}")


@app.command("sample")
@user_errors
def sample(model: str = typer.Option(..., "--model", "-m",
                                     help="combo.<a>+<b>@champion, concept.<name>@alias or <name>/<version>"),
           prompt: list[str] = typer.Option(..., "--prompt", "-p", help="a prompt (repeatable); concepts as <name>"),
           seeds: str = typer.Option("0", help="seeds: a range 0-7, a list 0,3,5, or both"),
           out: Path = typer.Option(..., "--out", "-o", help="folder for the images and images.json (replaced)"),
           sampler: Optional[str] = typer.Option(None, help="a conceptflow.sample.SAMPLERS name (default: the "
                                                 "sampler the generate stage used)"),
           steps: Optional[int] = typer.Option(None, help="denoising steps (default: the recorded setting)"),
           guidance_scale: Optional[float] = typer.Option(None, help="classifier-free guidance scale"),
           batch_size: Optional[int] = typer.Option(None, help="images per sampling batch"),
           project: Optional[Path] = typer.Option(None, help="checkout holding a project-relative base model "
                                                  "(default: the git checkout around the current folder)"),
           dvc_remote: Optional[Path] = typer.Option(None, envvar="CONCEPTFLOW_DVC_REMOTE",
                                                     help="DVC remote folder to check the files against "
                                                     "(default: the project's default local remote, if present)"),
           from_dvc: bool = typer.Option(False, help="read the model's files from the DVC remote, not the registry"),
           verify_base: bool = typer.Option(True, help="refuse a base model whose content hash differs"),
           device: str = typer.Option("cpu")):
    """Generate from a registered version (MLFLOW_TRACKING_URI): no catalog or training data needed."""
    from conceptflow.registry import tracking_uri
    from conceptflow.serving import dvc_remote as remotes
    from conceptflow.serving.base_model import git_toplevel
    from conceptflow.serving.from_registry import sample_registered
    from conceptflow.serving.reference import parse_model_reference, parse_seeds

    reference, seed_list = parse_model_reference(model), parse_seeds(seeds)
    root = (project or git_toplevel(Path.cwd()) or Path.cwd()).resolve()
    remote = dvc_remote or remotes.project_remote(root)
    if remote is not None and not remote.is_dir():
        if dvc_remote is not None or from_dvc:
            raise ConceptflowError(f"DVC remote {remote} is not a folder: pass --dvc-remote PATH")
        remote = None  # the project's configured remote is not on this machine: check against the registry only
    header = sample_registered(tracking_uri(root), reference, prompt, seed_list, out, sampler, steps, guidance_scale,
                               batch_size, project, remote, from_dvc, verify_base, device)
    typer.echo(f"{header['reference']} (v{header['version']}, artifact {header['artifact_md5']} from "
               f"{header['artifact_source']}{', checked against DVC' if header['dvc_checked'] else ''}; base "
               f"{header['base_model']}{' verified' if header['base_verified'] else ''}): "
               f"{len(prompt) * len(seed_list)} images in {out}")


@registry_app.command("show")
@user_errors
def registry_show(name: str = typer.Argument(..., help="e.g. concept.dog or combo.dog+cat"),
                  alias: str = typer.Option("champion"), catalog: Path = CatalogOption):
    """Print a registered version's lineage (which data, config, code and base made it)."""
    from conceptflow.registry import lookup, tracking_uri

    info = lookup(tracking_uri(load_catalog(catalog).root), name, alias)
    typer.echo(json.dumps(info, indent=2, default=str))


@registry_app.command("download")
@user_errors
def registry_download(name: str, destination: Path, alias: str = typer.Option("champion"),
                      catalog: Path = CatalogOption):
    """Download a registered version's files (adapter.safetensors, concept.json, ...)."""
    from conceptflow.registry import download, tracking_uri

    path = download(tracking_uri(load_catalog(catalog).root), name, alias, destination)
    typer.echo(str(path))


@app.command("lineage")
@user_errors
def lineage(model: str = typer.Argument(..., help="concept.<name>@champion, concept.<name>/<version> or combo.<a>+<b>..."),
            project: Optional[Path] = typer.Option(None, help="project folder whose registry to read (default: the "
                                                   "git checkout around the current folder; MLFLOW_TRACKING_URI wins)")):
    """Print a registered version's chain: dataset -> masks -> config -> code -> base -> adapter -> version."""
    from conceptflow.provenance.chain import chain_of, format_chain
    from conceptflow.registry import tracking_uri
    from conceptflow.serving.base_model import git_toplevel
    from conceptflow.serving.reference import parse_model_reference

    root = (project or git_toplevel(Path.cwd()) or Path.cwd()).resolve()
    typer.echo(format_chain(chain_of(tracking_uri(root), parse_model_reference(model))))


@app.command("reproduce")
@user_errors
def reproduce(model: str = typer.Argument(..., help="concept.<name>/<version> (or @alias)"),
              out: Path = typer.Option(..., "--out", "-o", help="fresh folder for the rebuilt one-concept project"),
              project: Optional[Path] = typer.Option(None, help="checkout of the project (base model folder, git "
                                                     "revision); default: the git checkout around the current folder"),
              dvc_remote: Optional[Path] = typer.Option(None, envvar="CONCEPTFLOW_DVC_REMOTE",
                                                        help="DVC remote folder (default: the project's default remote)"),
              verify_base: bool = typer.Option(True, help="refuse a base model whose content hash differs")):
    """Retrain a registered concept from its recorded config and DVC data; compare the adapter bit for bit."""
    from conceptflow.provenance.rebuild import reproduce as run
    from conceptflow.registry import tracking_uri
    from conceptflow.serving import dvc_remote as remotes
    from conceptflow.serving.base_model import git_toplevel

    root = (project or git_toplevel(Path.cwd()) or Path.cwd()).resolve()
    remote = dvc_remote or remotes.project_remote(root)
    if remote is None:
        raise ConceptflowError(f"{root} has no local default DVC remote: pass --dvc-remote PATH")
    result = run(tracking_uri(root), model, out, remote, project=root, verify_base=verify_base)
    typer.echo(f"{result.name}/{result.version} rebuilt in {result.folder}")
    typer.echo(f"  config hash  recorded {result.config_hash_recorded}  rebuilt {result.config_hash_rebuilt}")
    typer.echo(f"  code         recorded {result.revision_recorded}  running {result.revision_running}")
    typer.echo(f"  adapter md5  recorded {result.recorded_md5}  rebuilt {result.rebuilt_md5}")
    for path in result.differing_files:
        typer.echo(f"  differs: {path}")
    if not result.identical:
        for key, how in result.differing_tensors:
            typer.echo(f"  tensor {key}: {how}")
        typer.secho("MISMATCH: the rebuilt adapter differs from the registered one", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo("bit-identical: the rebuilt adapter.safetensors is the registered one")


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # python -m conceptflow.cli
    main()
