"""The package version, in one place: ``pyproject.toml`` reads it (setuptools ``dynamic``), manifests record it.

A module of its own so that the modules that record the version import it without importing ``layertap``'s
``__init__`` (whose lazy ``lt.*`` table reaches every stage: importing it from below would close a cycle).
"""

__version__ = "0.1.0"
