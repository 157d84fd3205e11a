"""Moved to :mod:`foundation.assets`. This alias keeps ``recipes.assets`` importable for code not yet updated (the
other method branches); delete it once they import ``foundation.assets``."""

import sys

from foundation import assets as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
