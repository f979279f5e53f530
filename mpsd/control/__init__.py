"""The control socket: its server inside ``mpsd run``, the CLI's client and the text view."""
