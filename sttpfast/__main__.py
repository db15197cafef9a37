"""``python -m sttpfast``: the ``sttpfast`` command (for environments without its script on PATH)."""
from sttpfast.cli import main

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="python -m sttpfast")
