"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class UserError(Exception):
    """Something the user can fix (a path, a flag value); the message says what to do."""


class ConfigError(UserError, ValueError):
    """A configuration value is out of range or inconsistent; the message names the flag."""


class DataError(UserError, RuntimeError):
    """A dataset file or folder is missing, truncated or corrupt; the message says how to fix it."""


class RunDirError(UserError, RuntimeError):
    """A run folder is missing, incomplete, or would be overwritten."""


def check(condition: bool, flag: str, requirement: str, value: object) -> None:
    """Raise :class:`ConfigError` naming ``flag`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{flag} must be {requirement} (got {value!r})")
