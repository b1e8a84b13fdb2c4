"""structlog, configured once at start (structlog "Logging best practices").

Context (association, SOP Instance UID, job id) is bound with contextvars, never
formatted into the message. JSON lines when stderr is not a TTY, the console renderer
when it is. pynetdicom's stdlib logger goes through the same renderer.
"""
from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
           "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(format: str = "auto", level: str = "info") -> None:
    """Set up structlog and the stdlib root logger; call once per process."""
    as_json = format == "json" or (format == "auto" and not sys.stderr.isatty())
    renderer = (structlog.processors.JSONRenderer() if as_json
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(),
                    structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),  # one write per line: processes share stderr
        cache_logger_on_first_use=False,
    )
    # Library loggers (pynetdicom) through the same renderer, quieter than our own.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, _LEVELS[level]))
