"""Callbacks that run ``torchdiag.watch`` inside other people's training loops.

* ``torchdiag.integrations.lightning.TorchDiagCallback``: Lightning (``pip install "torchdiag[lightning]"``).
* ``torchdiag.integrations.transformers.TorchDiagCallback``: the Hugging Face ``Trainer``
  (``pip install "torchdiag[transformers]"``).

Each submodule imports its framework when it is imported itself; importing this package imports neither.
"""
