"""Concept Conductor (seed 004): separate concept branches in one batched UNet call, layout
alignment to a DDIM-inverted reference, attention-output fusion with refined masks.

config.py (settings), prompts.py (branch prompts), inversion.py (DDIM inversion, cached keys),
hooks.py (what runs inside the UNet), fusion.py (the fusion equation), masks.py (k-means mask
refinement), pipeline.py (the sampler, registry row ``conductor``)."""
