"""ConceptSplit's LODA (seed 003, Algorithm 1): latent optimisation for disentangled attention.

- ``config.py``: its settings (``LodaConfig``, the catalog's ``generate.loda``);
- ``loss.py``: the equations as pure functions (smoothing, normalisation, harmonic mean of
  pairwise KL, ReLU(γ − KL_H), the step-size schedule, which layers give the maps);
- ``pipeline.py``: the guide that takes the latent steps inside the sampling core's ``denoise``
  and the batched sampler (its ``sample`` is the registry's entry point).
"""
