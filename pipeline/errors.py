"""The one exception type that means "the user asked for something we cannot do"."""
import click


class UserError(click.ClickException):
    """Bad input: printed as one line ``Error: ...`` with exit code 2, never a traceback."""

    exit_code = 2
