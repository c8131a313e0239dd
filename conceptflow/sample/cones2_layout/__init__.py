"""Cones 2 layout guidance (seed 001, reference ali-vilab/Cones-V2 ``layout_guidance.py``), one file per concern.

- ``config.py``: its settings (``Cones2LayoutConfig``, the catalog's ``generate.cones2_layout``), with the
  seed project's three switches (higher-resolution layers only, sigma-aware CFG, prompt-length padding);
- ``guidance.py``: the cross-attention score bias ``guidance_weight * w * log(1 + sigma^2) * std(QK)`` as an
  attention hook, the prompt-length key mask and the sigma-aware guidance scale;
- ``pipeline.py``: the batched sampler on the sampling core's ``denoise`` (its ``sample`` is the registry's
  entry point).
"""
