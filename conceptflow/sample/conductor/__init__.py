"""Concept Conductor (seed 004): attention fusion of separate concept branches with refined masks.

Built so far: settings (config.py), the fusion equation (fusion.py) and the k-means mask refinement
(masks.py). The sampling pipeline and registry row are not built yet."""
