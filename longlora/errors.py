"""Errors that mean "the input is wrong", as opposed to a bug: entry points report them in one line, no traceback."""


class InputError(ValueError):
    """Bad input (a file, a line, a parameter); the message names where and why."""
