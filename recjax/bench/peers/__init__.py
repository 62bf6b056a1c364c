"""Peer frameworks for `recjax bench`: each runs in its own virtualenv and prints JSON lines."""
