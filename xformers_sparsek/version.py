# Single source of the version: setup.py reads this file, the package re-exports it.
__version__ = "0.1.0"
