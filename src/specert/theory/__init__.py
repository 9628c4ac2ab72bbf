"""The mathematics: acceptance rules, target statistics, certificates, margin bounds, acceptance and divergences.

This layer imports nothing from the rest of specert (only :mod:`torch` and :mod:`numpy`): every function takes
logits ``[..., V]`` as a torch tensor or a numpy array and computes in the float dtype the numerics need
(:mod:`specert.theory.tensors`). THEORY.md is its specification; each function's docstring names its section.
"""
