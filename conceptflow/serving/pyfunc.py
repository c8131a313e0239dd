"""The MLflow pyfunc flavour of registered versions: ``ConceptModel`` and how it is saved.

Every version registration makes (``stages/register.py``) is a pyfunc model logged under the
run's ``pyfunc/`` artifacts: the stage folder as the artifact ``adapter``, the ``ServingSpec``
as ``model_config``, ``model_code.py`` as the code (models from code, no pickle). So::

    model = mlflow.pyfunc.load_model("models:/combo.dog+cat@champion")
    frame = model.predict(pd.DataFrame({"prompt": ["a <dog> and a <cat>"], "seed": [0]}),
                          params={"steps": 20})

Input: a DataFrame with a ``prompt`` column and an optional integer ``seed`` column (default 0),
or a dict of the same columns, or a list of prompts. Params (all optional): ``sampler`` (a
``conceptflow.sample.SAMPLERS`` name), ``steps``, ``guidance_scale``, ``batch_size``; empty or 0
means the setting recorded at registration (the generate stage's). Output: a DataFrame with
``prompt``, ``seed`` and ``image`` (the PNG, base64-encoded), one row per input row, in order.
``mlflow models serve -m models:/... --env-manager local`` answers ``POST /invocations`` with
``{"dataframe_split": {"columns": ["prompt", "seed"], "data": [...]}, "params": {...}}`` by
``{"predictions": [{"prompt", "seed", "image"}, ...]}``.

Loading needs ``conceptflow`` importable and the base model reachable (``serving.base_model``:
a project-relative base is looked up in ``$CONCEPTFLOW_PROJECT``, the git checkout around the
working folder, or this package's checkout; its content hash is checked).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import mlflow.pyfunc

from conceptflow.serving.spec import ServingSpec

ADAPTER_ARTIFACT = "adapter"
CODE_FILE = Path(__file__).with_name("model_code.py")
# The pyfunc's settings params: "" / 0 mean "as recorded at registration".
PARAM_DEFAULTS = {"sampler": "", "steps": 0, "guidance_scale": 0.0, "batch_size": 0}


def model_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False)]),
        outputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed"), ColSpec("string", "image")]),
        params=ParamSchema([ParamSpec("sampler", "string", ""), ParamSpec("steps", "long", 0),
                            ParamSpec("guidance_scale", "double", 0.0), ParamSpec("batch_size", "long", 0)]),
    )


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for package in ("mlflow", "torch", "diffusers", "transformers", "safetensors", "pandas", "pillow", "pydantic"):
        try:
            pinned.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pinned


def save_pyfunc_model(stage_dir: Path, spec: ServingSpec, destination: Path) -> Path:
    """Write the pyfunc model of a concept/fused folder to ``destination`` (a new folder)."""
    mlflow.pyfunc.save_model(
        str(destination), python_model=str(CODE_FILE), artifacts={ADAPTER_ARTIFACT: str(Path(stage_dir).resolve())},
        model_config=spec.to_dict(), signature=model_signature(), pip_requirements=_requirements(),
        metadata={"conceptflow.kind": spec.kind, "conceptflow.name": spec.name},
    )
    return Path(destination)


def read_saved_model(model_dir: Path) -> tuple[Path, ServingSpec]:
    """(adapter folder, spec) of a downloaded pyfunc model folder, without loading it."""
    from mlflow.models import Model

    flavour = Model.load(str(Path(model_dir) / "MLmodel")).flavors.get("python_function", {})
    try:
        adapter = Path(model_dir) / flavour["artifacts"][ADAPTER_ARTIFACT]["path"]
        config = flavour["config"]  # where save_model's model_config lands in MLmodel
    except (KeyError, TypeError):
        from conceptflow.errors import RegistryError

        raise RegistryError(f"{model_dir} is not a conceptflow pyfunc model (no adapter artifact or "
                            "model_config in its MLmodel); re-register it with `conceptflow register`") from None
    return adapter, ServingSpec.from_dict(config)


def _requests(model_input):
    import pandas as pd

    from conceptflow.errors import ConceptflowError
    from conceptflow.sample.core import SampleRequest

    if isinstance(model_input, str):
        model_input = [model_input]
    if isinstance(model_input, list) and all(isinstance(item, str) for item in model_input):
        model_input = {"prompt": model_input}
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    if "prompt" not in frame.columns:
        raise ConceptflowError(f"predict needs a 'prompt' column; got columns {list(frame.columns)}")
    seeds = frame["seed"] if "seed" in frame.columns else [0] * len(frame)
    return [SampleRequest(str(prompt), 0 if seed is None or seed != seed else int(seed))
            for prompt, seed in zip(frame["prompt"], seeds)]


def png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(text: str):
    """A PIL image from one ``image`` cell of the output."""
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB")


class ConceptModel(mlflow.pyfunc.PythonModel):
    """A registered concept or combination as an MLflow pyfunc (see the module docstring)."""

    def load_context(self, context) -> None:
        import os

        from conceptflow.serving.base_model import resolve_base_model
        from conceptflow.serving.generation import ServedModel

        self.spec = ServingSpec.from_dict(context.model_config)
        base = resolve_base_model(self.spec.base_model, self.spec.base_model_hash, self.spec.base_model_path,
                                  verify=os.environ.get("CONCEPTFLOW_VERIFY_BASE", "1") != "0")
        self.model = ServedModel(Path(context.artifacts[ADAPTER_ARTIFACT]), self.spec, base,
                                 os.environ.get("CONCEPTFLOW_DEVICE", "cpu"))

    def predict(self, context, model_input, params=None):
        import pandas as pd

        given = {**PARAM_DEFAULTS, **(params or {})}
        settings = self.spec.settings(**{key: (value or None) for key, value in given.items() if key in PARAM_DEFAULTS})
        requests = _requests(model_input)
        result = self.model.sample(requests, settings)
        return pd.DataFrame({"prompt": [r.prompt for r in requests], "seed": [r.seed for r in requests],
                             "image": [png_base64(image) for image in result.images]})
