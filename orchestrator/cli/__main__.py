"""``python -m orchestrator.cli``: the ``lorafleet`` command."""

import sys

from orchestrator.cli.main import main

sys.exit(main())
