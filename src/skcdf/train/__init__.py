"""Training SKCDF and its ablation variants (SPEC §2, §3).

- ``skcdf.train.config``: flat configuration, presets, ``--set`` overrides (``load_config``).
- ``skcdf.train.trainer``: the training loop (``train``) and the run folder it writes.
- ``skcdf.train.step``: the loss of one iteration for each family of variants.
- ``skcdf.train.losses``, ``skcdf.train.balance``, ``skcdf.train.knowledge_transfer``: its parts.
"""
