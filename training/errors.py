"""Errors of the training side, each naming what to fix."""


class TrainingError(Exception):
    """Base class of every error the training side reports to a user."""


class ArchiveError(TrainingError, ValueError):
    """An annotated archive is invalid; the message names the row, the column and the file."""
