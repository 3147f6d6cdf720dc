"""mmtrain: a config-driven command-line trainer for image-text models."""

__version__ = "0.2.0"  # the package's version (pyproject.toml reads it from here)
