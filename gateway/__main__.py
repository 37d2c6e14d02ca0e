"""Lets `python -m gateway` run the command line."""

from gateway.cli import main

raise SystemExit(main())
