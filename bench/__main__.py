"""``python -m bench``: run every benchmark (each is also runnable on its own)."""

from bench import sim_pacs

raise SystemExit(sim_pacs.main())
