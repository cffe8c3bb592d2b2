import sys

from ops.models.cli import main

sys.exit(main())
