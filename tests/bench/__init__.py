"""pipes next to its peers: the `make bench` suite (run.py); not collected by pytest."""
