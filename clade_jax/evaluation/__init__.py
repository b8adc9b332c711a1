"""Evaluation of synthesized images: FID (`fid`), segmentation scores and model complexity.

Submodules are imported explicitly (`from clade_jax.evaluation import fid`); this package file
imports nothing so that each metric pulls in only its own dependencies.
"""
