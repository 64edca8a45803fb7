"""`kubectl retransmit`: the kubectl/oc plugin. It stands on retransmit_core alone."""
