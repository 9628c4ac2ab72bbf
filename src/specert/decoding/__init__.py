"""Speculative decoding of an in-process target: loading models, the forward passes (transformers' and the fast path),
KV caches, quantized copies of the target, the draft tree and drafter interface, draft-shape schedules, the decode
loop and its per-position trace. Imports :mod:`specert.theory` only; drafters implement
:class:`~specert.decoding.drafts.Drafter` one layer up, in :mod:`specert.drafters`."""
