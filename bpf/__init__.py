"""The kernel program (retransmit.bpf.c) and its shared header, shipped as package data."""
