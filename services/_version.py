"""The runyard version: a leaf module (imports nothing), read by the
package root, every service and ``pyproject.toml`` (``tool.setuptools.dynamic``)."""

__version__ = "0.1.0"
