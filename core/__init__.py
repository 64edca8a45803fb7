"""retransmit-operator's shared core: what the operator, the agent and the kubectl plugin all stand on.

The API models (api), object names and labels (naming, daemonset), the operator-agent
contract (contract), the write schedule and heartbeat rules (schedule), ranking, pod
attribution (podindex), API error wording (apierrors), input messages (validation) and the
kernel vocabulary (kernelvocab). Pure: it imports neither the operator nor the agent.
"""
