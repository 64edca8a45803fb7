"""retransmit-operator: the kopf operator and the RetransmitTrace API (retransmit_core.api)."""
