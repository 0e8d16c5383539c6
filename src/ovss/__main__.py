"""``python -m ovss`` (also what ``torchrun -m ovss`` runs): the command line."""

from ovss.cli.main import entry

entry()
