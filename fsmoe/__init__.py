"""fsmoe: a flexible and scalable training system for sparse Mixture-of-Experts models."""

__version__ = "0.1.0"
__all__ = ["__version__"]
