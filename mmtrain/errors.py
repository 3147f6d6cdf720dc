"""The one exception type for mistakes a user can fix (bad config, bad data, bad paths), and
the one reading of a text file the user names (`read_text`)."""

from __future__ import annotations

from pathlib import Path


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


def read_text(path: Path | str, what: str) -> str:
    """The text of a file the user named (`what` says which: "candidates=names.txt"), read
    as UTF-8 (a byte-order mark is dropped); a UserError that names it when it is missing,
    a folder, unreadable, binary or not UTF-8."""
    path = Path(path).expanduser()
    fix = "give the path of a UTF-8 text file"
    if not path.exists():
        raise UserError(f"{what}: {path} does not exist; {fix}.")
    if path.is_dir():
        raise UserError(f"{what}: {path} is a folder; {fix}.")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(
            f"{what}: cannot read {path} ({error.strerror or error}); check its permissions."
        ) from None
    if b"\0" in data:
        raise UserError(
            f"{what}: {path} is a binary file (it holds NUL bytes), not text; {fix} "
            "(UTF-16 text: save it as UTF-8)."
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(
            f"{what}: {path} is not UTF-8 text ({error.reason} at byte {error.start}); "
            "save it as UTF-8."
        ) from None
