"""The HTTP side: the Litestar app, its routes, the upstream client and the CLI."""
