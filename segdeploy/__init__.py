"""segdeploy: from a segmentation recipe to a fast, verified deployment."""

__version__ = "0.1.0"
