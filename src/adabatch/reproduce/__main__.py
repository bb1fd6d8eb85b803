"""``python -m adabatch.reproduce``: the same as ``adabatch reproduce``."""

from adabatch.reproduce import main

raise SystemExit(main())
