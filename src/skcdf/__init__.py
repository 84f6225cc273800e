"""skcdf: SKCDF (CVPR 2025) semi-supervised, class-imbalanced 3D multi-organ segmentation."""

from skcdf._version import __version__

__all__ = ["Segmenter"]


def __getattr__(name: str):
    # `from skcdf import Segmenter` without making `import skcdf` (and so every CLI call) import torch.
    if name == "Segmenter":
        from skcdf.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'skcdf' has no attribute {name!r}")
