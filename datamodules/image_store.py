"""Moved to :mod:`foundation.image_store`. This alias keeps ``datamodules.image_store`` importable for code not yet
updated (the other method branches); delete it once they import ``foundation.image_store``."""

import sys

from foundation import image_store as _moved

sys.modules[__name__] = _moved
