"""The embedded toy trio that shows the RAST effect on a CPU.

- :mod:`.task`: the reasoning task (parity of bit strings; direct vs worked answer styles), the exact
  answer checker and the hash split that keeps held-out problems out of training.
- :mod:`.tokenizer`: the shared character tokenizer (``tokenizers``; saved as ``tokenizer.json``).
- :mod:`.train`: pretraining of the base and expert base, GRPO for the expert, evaluation table
  (``python -m rast_kernels.toy.train``; ``--smoke`` for CI).
- :mod:`.demo`: ``python -m rast_kernels demo``.
- ``trio/``: the shipped models (``base/``, ``expert/``, ``expert_base/``), ``eval.json`` and ``TRAINING.md``.
"""
