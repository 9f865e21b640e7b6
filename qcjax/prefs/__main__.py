import sys

from qcjax.prefs.cli import main

sys.exit(main())
