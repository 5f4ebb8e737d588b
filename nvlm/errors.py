"""The one class of refused input: a flag, a config, a file, data or a checkpoint that cannot be
used, or an argument outside an API's contract.

InputError is a ValueError, so callers that catch ValueError keep working; the command lines
(nvlm/train.py, python -m nvlm, python -m nvlm.data) print it as one line naming what to fix and
exit with 2. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """An input this package refuses; the message names the argument, flag or file and why."""
