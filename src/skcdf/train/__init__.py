"""Training SKCDF and the other methods of :mod:`skcdf.methods` (SPEC §2, §3).

- ``skcdf.train.config``: the typed configuration (``Config``), presets, ``--set`` overrides (``load_config``).
- ``skcdf.train.trainer``: the training loop (``train``), read top to bottom.
- ``skcdf.train.streams``: the cases a run trains on and its data streams (public: benchmarks use them).
- ``skcdf.train.run_folder``: the run folder's bookkeeping (configuration check, random state, metrics, log).
- ``skcdf.train.step``: the loss of one iteration for each step kind; ``losses``, ``balance``,
  ``knowledge_transfer``, ``schedules`` and ``monitor``: its parts and what is measured around it.
- ``skcdf.train.processes``: where a process stands under torchrun.
"""
