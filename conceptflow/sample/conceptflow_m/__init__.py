"""ConceptFlow-M (§4.2): multi-concept sampling from a fused model, one file per concern.

- ``config.py``: its settings (``ConceptFlowMConfig``, the catalog's ``generate.conceptflow_m``);
- ``sama.py``: Subject-Adaptive Matching Attention (Eq. 6-9) as an attention hook;
- ``layout_guidance.py``: layout-consistency guidance (Eq. 10-11), the per-step gradient step;
- ``pipeline.py``: the batched sampler that runs both through the sampling core's ``denoise``
  (its ``sample`` is the registry's entry point).
"""
