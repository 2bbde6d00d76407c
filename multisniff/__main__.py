"""Lets `python -m multisniff` run the command line."""

from multisniff.cli import main

raise SystemExit(main())
