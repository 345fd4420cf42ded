"""python -m lora_server.loadtest: the same as the `lora-loadtest` console script."""

import sys

from lora_server.loadtest.cli import main

if __name__ == "__main__":
    sys.exit(main())
