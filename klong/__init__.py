"""The command line (`klong ...`, klong.cli) and the demo on top of the library packages."""

from core import aliases as _aliases

_aliases.install()  # klong.settings, klong.broker, ... still import (deprecated; see core.aliases)
