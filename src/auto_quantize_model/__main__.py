"""``python -m auto_quantize_model`` is ``aqm`` (handy where the console script is not on PATH)."""

from auto_quantize_model.app.cli import main

raise SystemExit(main())
