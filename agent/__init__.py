"""retransmit-agent: loads the BPF program, reads its maps, reports per-node results."""
