"""`python -m afrl_fast.serve`: the CLI (`cli.main`), or one line when the service's extra is missing."""
import sys

EXTRA = {"fastapi", "starlette", "uvicorn", "pydantic", "pydantic_core", "prometheus_client"}

try:
    from .cli import main
except ImportError as e:
    if (e.name or "").split(".")[0] not in EXTRA:
        raise
    print(f"error: the service needs its extra: pip install 'afrl-fast[serve]' ({e})", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
