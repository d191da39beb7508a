import sys

from kdaug.cli.main import main

sys.exit(main())
