"""The stage log of an experiment run: the ``nlsr_hub`` loggers to stderr and a file, for the run only."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def stage_log(path: Path) -> Iterator[None]:
    """Stage progress of the ``nlsr_hub`` loggers to stderr and `path` while the run lasts; the process's own
    logging set-up (root handlers, levels) is left as it was."""
    logger = logging.getLogger("nlsr_hub")
    path.parent.mkdir(parents=True, exist_ok=True)
    handlers = [logging.StreamHandler(sys.stderr), logging.FileHandler(path, encoding="utf-8")]
    formatter = logging.Formatter("%(asctime)s %(name)s: %(message)s")
    saved = logger.level, logger.propagate
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


__all__ = ["stage_log"]
