"""`python -m pelagos_bpf.cli` = `pelagos-bpf` (for trees without the console script)."""

from . import main

raise SystemExit(main())
