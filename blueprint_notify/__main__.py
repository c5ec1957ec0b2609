"""``python -m blueprint_notify``: see :mod:`blueprint_notify.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m blueprint_notify"))
