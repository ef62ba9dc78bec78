"""The errors that mean "the input is wrong": a config, dataset, image, weights file, model
file, proposals file, cache or device the user named.  Their messages name the file and the
problem, so the command-line tools print them as one `error:` line and exit with 2 instead
of a traceback (`detector.cli.run_tool`).  Anything else that escapes is a bug.

Each subclass also derives from the built-in exception a caller would expect (ValueError,
FileNotFoundError, RuntimeError), so `except ValueError` keeps working.
"""


class InputError(Exception):
    """Bad input that the user can fix; the message says what and where."""


class ConfigError(InputError, ValueError):
    """A config file, key, value or combination of values is wrong."""


class DatasetError(InputError, ValueError):
    """A dataset (annotations, split, class list, images) cannot be used as asked."""


class ImageError(InputError, ValueError):
    """An image file cannot be read or is not an image."""


class WeightsError(InputError, FileNotFoundError):
    """Backbone weights are missing or do not fit; the message says how to supply them."""


class ModelFormatError(InputError, ValueError):
    """A model file is damaged, of another format or version, or of the wrong kind."""


class ProposalsError(InputError, ValueError):
    """Proposal boxes (from a file or a caller) do not fit the dataset or the image."""


class CacheError(InputError, RuntimeError):
    """A cache or run-folder file is damaged or missing; the message says what to delete."""


class DeviceError(InputError, RuntimeError):
    """The device asked for (e.g. cuda) is not available here."""


class DiskError(InputError, RuntimeError):
    """A cache, run folder or output could not be written: the disk is full, over quota or
    read-only.  Not an OSError on purpose: the per-image loops that skip an unreadable image
    catch OSError, and a full disk must stop the tool instead (detector.cache.writing_to)."""
