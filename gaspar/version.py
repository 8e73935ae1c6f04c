"""gaspar's version, in a leaf module: read by setup.cfg without importing gaspar, and by
its modules without importing the package (which imports them: a circle)."""

__version__ = "2.0.0"
