"""The one exception type users see: its message is a single line naming the problem and the fix."""


class LopdError(Exception):
    """Bad input or state that the user can fix. The CLI prints `error: <message>` and exits with 2."""
