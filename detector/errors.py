"""The base of the errors that mean "the input is wrong" (config, dataset, image, weights,
model file).  Their messages name the file and the problem, so the command-line tools print
them as one line instead of a traceback (`detector.cli.run_tool`)."""


class InputError(Exception):
    """Bad input that the user can fix; the message says what and where."""
