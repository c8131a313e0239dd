"""conceptflow: personal concepts to fine-tuned Stable-Diffusion adapters and multi-concept images.

The core library (this package) holds all the torch/diffusers code and imports no Prefect;
``tasks/`` and ``flows/`` wrap it for orchestration.
"""

__version__ = "0.1.0"
