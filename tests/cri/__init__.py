"""CRI test client: drive a real containerd through runtime.v1 (see client.py, __main__.py)."""
