"""Errors of the training side, each naming what to fix."""
from dicom_node.errors import NodeError


class ArchiveError(NodeError, ValueError):
    """An annotated archive is invalid; the message names the row, the column and the file."""
