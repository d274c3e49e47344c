import sys

from pipeline_tasks.cli import main

sys.exit(main())
