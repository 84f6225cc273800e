"""Data: the prepared data set layout, raw-data preparation, training loaders and the synthetic phantom.

- :mod:`skcdf.data.layout`      the prepared layout on disk (dataset.json, npy/, splits/), reading and writing
- :mod:`skcdf.data.preprocess`  reading scans with checks, resampling to the prepared size and back, normalisation
- :mod:`skcdf.data.sources`     finding the cases of raw Synapse, AMOS and nnU-Net-style folders
- :mod:`skcdf.data.splits`      seeded train/eval/test and labeled/unlabeled splits
- :mod:`skcdf.data.prepare`     ``skcdf prepare``: raw folder → prepared layout
- :mod:`skcdf.data.loaders`     PyTorch datasets for training (random patches) and validation (centre crops)
- :mod:`skcdf.data.laterality`  left/right class pairs and the left-right axis, for flips that keep laterality
- :mod:`skcdf.data.stats`       class voxel counts and the fractions table
- :mod:`skcdf.data.phantom`     ``skcdf phantom``: the synthetic abdominal CT data set
"""
