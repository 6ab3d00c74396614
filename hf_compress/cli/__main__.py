"""`python -m hf_compress.cli ...`: the `hf-compress` command without the installed script."""

import sys

from . import main

sys.exit(main())
