"""``python -m t2ialign``: the same as the ``t2ialign`` command."""

import sys

from t2ialign.cli.main import main

sys.exit(main())
