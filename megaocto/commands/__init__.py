"""Subcommands of `megaocto`; see megaocto/cli.py for the module contract."""
