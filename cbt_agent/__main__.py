import sys

from cbt_agent.cli import main

sys.exit(main())
