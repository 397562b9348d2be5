"""Data: corpus readers (``sources``), prepared shards and the mixture pipeline.

Kept import-light: submodules are imported where they are used.
"""

from jaxlm.errors import JaxlmError


class DataError(JaxlmError, ValueError):
    """Unusable input data: the message names the file (and line, field or byte offset) and what was expected."""
