// Command pause is the real node's sandbox program (tests/harness/realnode.py imports it
// as registry.k8s.io/pause:<tag>; no registry is reachable here). Like Kubernetes' own
// pause: it holds the pod's namespaces, reaps orphans (it is PID 1 when the pod shares its
// PID namespace) and exits on SIGINT or SIGTERM.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range signals {
		if s == syscall.SIGCHLD {
			for {
				pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
			continue
		}
		os.Exit(0)
	}
}
