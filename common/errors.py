"""The one error type users see: `UserError` is printed as `error: <message>` with exit code 2, no traceback."""


class UserError(Exception):
    """A problem the user can fix. The message names the problem and, in parentheses, what to do."""
