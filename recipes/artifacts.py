"""Moved to :mod:`foundation.artifacts`. This alias keeps ``recipes.artifacts`` importable for code not yet updated (the
other method branches); delete it once they import ``foundation.artifacts``."""

import sys

from foundation import artifacts as _moved

if __name__ == "__main__":
    sys.exit(_moved._main())
sys.modules[__name__] = _moved
