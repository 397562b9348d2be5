import sys

from jaxlm.cli import main

sys.exit(main())
