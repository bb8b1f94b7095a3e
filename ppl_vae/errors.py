"""User-facing errors: the CLI prints their message on one line and exits with code 2 (3 for a
diverged training run)."""


class UserError(Exception):
    """Something the user can fix (a path, a flag value); the message says what to do."""


class ConfigError(UserError, ValueError):
    """A configuration value is out of range or inconsistent; the message names the flag."""


class DataError(UserError, RuntimeError):
    """A dataset file or folder is missing, truncated or corrupt; the message says how to fix it."""


class RunDirError(UserError, RuntimeError):
    """A run folder is missing, incomplete, or would be overwritten."""


class Diverged(UserError, RuntimeError):
    """Training met a non-finite loss and stopped; the last finite checkpoint is kept."""

    exit_code = 3


def check(condition: bool, flag: str, requirement: str, value: object) -> None:
    """Raise :class:`ConfigError` naming ``flag`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{flag} must be {requirement} (got {value!r})")


def first_line(err: BaseException, limit: int = 0) -> str:
    """The first line of an exception's message (its type's name when it has none), for a
    one-line error; cut to ``limit`` characters with "..." (0: not cut)."""
    text = str(err).strip()
    return _cut(text.splitlines()[0] if text else type(err).__name__, limit)


def one_line(err: BaseException, limit: int = 160) -> str:
    """An exception's whole message on one line (whitespace collapsed; its type's name when
    it has none), cut to ``limit`` characters with "..."."""
    return _cut(" ".join(str(err).split()) or type(err).__name__, limit)


def _cut(text: str, limit: int) -> str:
    return text if not limit or len(text) <= limit else text[: limit - 3] + "..."
