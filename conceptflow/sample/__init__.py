"""Sampling: the one sampling core (``core.py``) and the samplers built on it (``SAMPLERS``)."""

from conceptflow.sample.registry import SAMPLERS, SamplerSpec, SamplingResult, get_sampler

__all__ = ["SAMPLERS", "SamplerSpec", "SamplingResult", "get_sampler"]
