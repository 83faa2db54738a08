"""``python -m bridge``: the same as the ``orangepill-bridge`` command."""

from __future__ import annotations

import sys

from bridge.cli import main

sys.exit(main())
