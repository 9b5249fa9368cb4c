"""Errors users see as one line (no traceback) from our commands. No torch here.

Raise ``UserError`` for bad input: a missing or unreadable file, a wrong value in a
recipe, an unknown coefficient name. ``MergeInputError`` is the merge math's kind
(bad checkpoints or merge parameters). Both are ``ValueError``s, so Python callers
can catch them as such. Set ``MERGEKIT_RLVR_DEBUG=1`` to see the traceback.
"""


class UserError(ValueError):
    """Bad input, reported as one line naming the file, tensor or parameter."""


class MergeInputError(UserError):
    """Bad input to a merge: mismatched shapes, missing tensors, NaN, bad ranges."""
