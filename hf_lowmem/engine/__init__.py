"""Training engines: code that takes over where weights live and how a step runs (see ``interface``)."""
