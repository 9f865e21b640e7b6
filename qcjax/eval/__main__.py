import sys

from qcjax.eval.cli import main

sys.exit(main())
