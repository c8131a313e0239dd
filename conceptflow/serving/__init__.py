"""Serving registered versions: generation from a registry name and the MLflow pyfunc flavour.

Above the registry (it reads versions through ``conceptflow.registry``) and below the stages
(``stages/register.py`` saves each version's pyfunc model with ``serving.pyfunc``).

- ``reference``: ``combo.a+b@champion`` / ``concept.x/3`` and seed lists (``0-7``, ``0,3,5``);
- ``spec``: ``ServingSpec``, what a version needs to sample without the catalog;
- ``base_model``: the recorded base model id/path resolved on this machine, its hash checked;
- ``dvc_remote``: a DVC remote read by md5 (check or fetch a version's folder);
- ``generation``: ``ServedModel`` (base + concept/fused model applied, sampled by a SAMPLERS row)
  and the images + images.json writer;
- ``from_registry``: ``sample_registered``, what ``conceptflow sample --model`` runs;
- ``pyfunc`` / ``model_code``: ``ConceptModel``, the pyfunc every registered version loads as.

This package's ``__init__`` imports nothing (mlflow reads its settings on import: the CLI sets
them first).
"""
