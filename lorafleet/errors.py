"""One exception type for every mistake a user can fix.

The CLI prints these as a single red line (no traceback): the message names the problem and
the fix. Anything else that escapes is a bug in lorafleet and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a config key, a data file, an adapter, a path. The message says how to fix it."""
