"""The one exception type for bad user input.

Scripts catch it and print its message as a single line, then exit with status 2. Library code raises it
for anything a user can fix (a missing folder, a malformed file, a bad flag value); bugs stay tracebacks.
"""


class InputError(ValueError):
    """A problem with the user's files or arguments, described in one line."""
