"""Server-side modules of the ksrpc stand-in (only the demo)."""
