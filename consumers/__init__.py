"""Consumers: what reads the events back from Kafka: the archive sink, the judge, dataset builds."""

from core import aliases as _aliases

_aliases.install()  # consumers.chat, consumers.tokenize, consumers.flush still import (deprecated; see core.aliases)
