"""The one exception type for mistakes a user can fix (bad config, bad data, bad paths)."""


class UserError(Exception):
    """A problem with the user's input: printed as a short message, without a traceback.

    The message says what is wrong, where, and how to fix it. Anything else raised inside
    mmtrain is a bug and keeps its traceback.
    """


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped a command. The message says what was kept and how to go on;
    the process exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as a
    shell reports a process that a signal ended."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        import signal

        return 128 + int(getattr(signal, self.signal_name, signal.SIGTERM))
