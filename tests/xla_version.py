"""The jaxlib version, for tests of what XLA itself produces (buffer assignment, compile log).

Those tests pin numbers measured with jaxlib 0.10.2 (CI). Older jaxlibs run the
library correctly (the rest of the suite passes with the oldest supported
versions, README "Install") but their XLA differs in these outputs.
"""

import importlib.metadata


def _version(package: str) -> tuple[int, ...]:
  parts = []
  for part in importlib.metadata.version(package).split("."):
    if not part.isdigit():
      break
    parts.append(int(part))
  return tuple(parts)


JAXLIB = _version("jaxlib")
