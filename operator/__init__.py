"""retransmit-operator: the kopf operator and the RetransmitTrace API (retransmit_operator.api)."""
