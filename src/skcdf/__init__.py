"""skcdf: SKCDF (CVPR 2025) semi-supervised, class-imbalanced 3D multi-organ segmentation."""

__version__ = "0.1.0"
