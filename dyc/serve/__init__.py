"""Serving: ``dyc serve`` puts a bundle behind Triton Inference Server with step-level batching.

``request`` (the Triton tensors and their validation), ``batcher`` (the step-level batcher and its
policy), ``server`` (the PyTriton binding), ``client`` (a tritonclient helper: ``dyc query``).
Only ``batcher`` and ``request`` import without the ``serve`` extra's packages.
"""
