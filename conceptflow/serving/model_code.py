"""The pyfunc model's code file (MLflow "models from code"): copied into every saved model.

MLflow 3 refuses to unpickle python models by default, so the model is saved as this file,
which MLflow runs on load; it names the ``conceptflow.serving.pyfunc.ConceptModel`` to serve.
The loading environment must have ``conceptflow`` importable (a checkout with its venv).
Nothing imports this module; ``mlflow.pyfunc.load_model`` executes it.
"""

from mlflow.models import set_model

from conceptflow.serving.pyfunc import ConceptModel

set_model(ConceptModel())
