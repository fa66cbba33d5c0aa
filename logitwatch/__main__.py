import sys

from logitwatch.cli import main

sys.exit(main())
