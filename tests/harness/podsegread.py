"""PodSegmentReader (retransmit_agent.podsegments) in a process of its own, so a kernel test
can run it with the agent's privileges rather than the test's (e.g. under setpriv without
CAP_SYS_PTRACE). argv[1]: when counting began (ISO 8601). Each stdin line is a JSON list of
PodFacts fields; each answer a JSON line {"namespace/pod": [outSegs, retransSegs], ...}.

    python -m tests.harness.podsegread 2026-12-02T06:00:00+00:00
"""

from __future__ import annotations

import json
import sys
from datetime import datetime

from retransmit_agent.podsegments import PodSegmentReader
from retransmit_core.podindex import PodFacts


def main() -> None:
    reader = PodSegmentReader(datetime.fromisoformat(sys.argv[1]))
    for line in sys.stdin:
        pods = [PodFacts(**{**fields, "ips": tuple(fields["ips"]), "host_ips": tuple(fields["host_ips"])})
                for fields in json.loads(line)]
        totals = reader.read(pods)
        print(json.dumps({f"{ns}/{pod}": [s.out_segs, s.retrans_segs] for (ns, pod), s in totals.items()}), flush=True)


if __name__ == "__main__":
    main()
