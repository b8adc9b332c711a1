"""Evaluators in the style of big_vision: objects built from the config, run over the mesh.

`common.py` holds the per-batch runner (one jit-compiled function sharded over the training mesh
that synthesizes and runs every evaluator's device part), `fid.py` the FID evaluator (Inception
pool features, streamed float64 statistics), `segmentation.py` the segmentation evaluator
(confusion-matrix counts computed on device). Import the submodules explicitly.
"""
