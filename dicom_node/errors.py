"""Errors of the node, each with a message a hospital admin can act on."""


class NodeError(Exception):
    """Base class of every error the node reports to a user."""


class UnsupportedImage(NodeError, ValueError):
    """The file is not a single-frame monochrome image this node can enhance."""


class ConfigError(NodeError, ValueError):
    """config.toml is invalid; the message names the key and the problem."""


class UnreadablePixels(NodeError, ValueError):
    """The header of a received file is whole but its Pixel Data is not (truncated, torn, no
    fragments): it can be forwarded as received, not enhanced. `dataset` is what was parsed."""

    def __init__(self, message: str, dataset):
        super().__init__(message)
        self.dataset = dataset
