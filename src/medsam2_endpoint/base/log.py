"""The package's one logger. Only `azmlinfsrv.*` loggers reach the Azure inference server's log below WARNING."""

import logging

LOGGER_NAME = "azmlinfsrv.medsam2"
log = logging.getLogger(LOGGER_NAME)
