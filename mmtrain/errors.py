"""The one exception type for mistakes a user can fix (bad config, bad data, bad paths)."""


class UserError(Exception):
    """A problem with the user's input: printed as a short message, without a traceback.

    The message says what is wrong, where, and how to fix it. Anything else raised inside
    mmtrain is a bug and keeps its traceback.
    """
