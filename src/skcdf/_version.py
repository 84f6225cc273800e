"""The package version, importable without the package root (see skcdf/__init__.py)."""

__version__ = "0.1.0"
