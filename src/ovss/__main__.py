"""``python -m ovss`` (also what ``torchrun -m ovss`` runs): the command line."""

import sys

from ovss.cli.main import main

sys.exit(main())
