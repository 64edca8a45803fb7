/* Shared layout of retransmit.bpf.c's maps and events: the one source of truth.
 *
 * Python never re-declares these structs: bcc exposes map keys/values as ctypes types
 * (table.Key / table.Leaf) and events through table.event(data).
 * Addresses are kept as the tracepoint gives them (network byte order bytes);
 * ports are host byte order (the tcp tracepoints store ntohs()).
 */
#ifndef RETRANSMIT_H
#define RETRANSMIT_H

/* Compile-time knobs (cflags -D...), chosen by the agent. */
/* Map sizes come from the agent's compile flags (agent/kernelconfig.py), whose defaults are
 * retransmit_core.kernelvocab's: one definition, no second copy here. */
#ifndef FLOW_CAPACITY
#error "FLOW_CAPACITY (entries in each of flows4 and flows6, LRU) comes from the agent's compile flags"
#endif
#ifndef RINGBUF_PAGES
#error "RINGBUF_PAGES (ring buffer size in pages, a power of two) comes from the agent's compile flags"
#endif
#ifndef OWNER_CAPACITY
#error "OWNER_CAPACITY (entries in `owners`, retransmits per local address) comes from the agent's compile flags"
#endif
#ifndef FILTER_CAPACITY
#error "FILTER_CAPACITY (entries in each filter map: CIDRs, local IPs) comes from the agent's compile flags"
#endif

/* Values shared with Python come from the agent as -D flags, defined once there
 * (agent/kernelconfig.py program_defines): AF_INET_, AF_INET6_ (address families),
 * FAMILY_IPV4, FAMILY_IPV6 (config.families bits), KIND_RETRANSMIT, KIND_SYNACK
 * (struct event.kind), TCP_SYN_SENT_, TCP_SYN_RECV_ (enum tcp_state) and CAUSE_* below.
 * tcp_retransmit_synack carries no state: a request socket is in NEW_SYN_RECV, which `ss`
 * and users call SYN-RECV, so SYN-ACK retransmits are filed under TCP_SYN_RECV_. */
#if !defined(AF_INET6_) || !defined(FAMILY_IPV6) || !defined(KIND_SYNACK) || !defined(TCP_SYN_RECV_)
#error "shared constants come from the agent's compile flags (agent/kernelconfig.py)"
#endif

/* TCP states are 1..13 (include/net/tcp_states.h); index 0 collects anything else. */
#define STATE_SLOTS 16

/* Why a segment was retransmitted, from the socket's congestion-avoidance state (read through
 * the node's BTF offsets; enum tcp_ca_state: Open 0, Disorder 1, CWR 2, Recovery 3, Loss 4). */
/* The values come from the agent (-DCAUSE_<NAME>=i, from kernelvocab.RETRANSMIT_CAUSES, with the
 * constants above):
 *   CAUSE_UNKNOWN  no BTF, or a SYN-ACK (a request socket has no such state)
 *   CAUSE_TIMEOUT  Loss: the retransmission timer fired (SYN retransmits too)
 *   CAUSE_FAST     Recovery (and CWR): fast retransmit after dupacks / SACK / RACK
 *   CAUSE_PROBE    Open, Disorder: tail loss probes and early retransmits */
#ifndef CAUSE_PROBE
#error "CAUSE_* come from the agent's compile flags (agent/kernelconfig.py, retransmit_core.kernelvocab)"
#endif
#define CAUSE_SLOTS 4             /* a power of two: indexes are masked with it */

/* The socket at a retransmit, read through BTF offsets (all 0 and valid 0 without BTF). */
struct sock_info {
    u32 srtt_us;           /* smoothed RTT in microseconds (tcp_sock.srtt_us >> 3) */
    u32 snd_cwnd;          /* congestion window, segments */
    u32 packets_out;       /* segments in flight */
    u32 retrans_out;       /* retransmitted segments in flight */
    u32 data_segs_out;     /* data segments sent over the connection's life, retransmits included */
    u32 total_retrans;     /* segments retransmitted over the connection's life */
    u8 ca_state;
    u8 timeouts;           /* consecutive unrecovered timeouts (icsk_retransmits) */
    u8 valid;
    u8 segs_valid;         /* data_segs_out and total_retrans were read (HAVE_SOCK_SEGS) */
};

/* How old a run's socket statistics may grow before a retransmit of the run reads them
 * again (SOCK_READ_INTERVAL_NS, from the agent's compile flags): a flow's counters and RTT
 * are then from at most that long before its latest retransmit, for one read per interval
 * per busy socket instead of one per event. */
#ifndef SOCK_READ_INTERVAL_NS
#error "SOCK_READ_INTERVAL_NS comes from the agent's compile flags (agent/kernelconfig.py)"
#endif

/* The single entry of the `config` array; written by the agent before counting. */
struct config {
    u32 families;          /* FAMILY_* bits allowed; the agent always sets at least one */
    u32 states;            /* bit (1 << state) allowed; 0 = every state */
    u32 ports_enabled;     /* 1: keep only flows whose local or remote port is in `ports` */
    u32 cidrs_enabled;     /* 1: keep only flows whose remote address is in cidrs4/cidrs6 */
    u32 local_ips_enabled; /* 1: keep only flows whose local address is in local4/local6 */
    u32 max_per_second;    /* sampled events per second to user space; 0 = no samples */
    u32 generation;        /* bumped by the agent on every change: ends the per-CPU runs,
                              whose flows passed the address filters of the old settings */
    u32 cgroups_enabled;   /* 1: a flow whose local address is a node address (local4/6 value
                              LOCAL_NODE) passes only when its socket's cgroup is in `cgroups` */
};

/* local4/local6 values (LOCAL_SELECTED, LOCAL_NODE from the agent's compile flags): a
 * selected pod's own address passes the local-IP filter; a node address (hostNetwork pods,
 * node processes) passes when its socket's cgroup is selected. */
#ifndef LOCAL_NODE
#error "LOCAL_SELECTED and LOCAL_NODE come from the agent's compile flags (agent/kernelconfig.py)"
#endif

/* The flow maps' keys: one map per family, because hashing a 12-byte key costs much less
 * than a 36-byte one. */
struct flow_key4 {
    u32 saddr;             /* local (retransmitting) side, network byte order */
    u32 daddr;             /* remote side */
    u16 sport;             /* local port, host byte order */
    u16 dport;             /* remote port */
};

struct flow_key6 {
    u8 saddr[16];
    u8 daddr[16];
    u16 sport;
    u16 dport;
};

/* A flow of either family as the program handles it between the tracepoint and the flow
 * maps: IPv4 addresses occupy the first 4 bytes of saddr/daddr (the rest 0). */
struct flow_key {
    u8 saddr[16];
    u8 daddr[16];
    u16 sport;
    u16 dport;
    u16 family;            /* AF_INET_ or AF_INET6_: the wire's family */
    u16 pad;
};

struct flow_stats {
    u64 cgroup;              /* the socket's cgroup v2 id, read once when the flow entered the
                                map (HAVE_SOCK_CGROUP); 0: unknown (no cgroup read, a SYN-ACK) */
    u64 retransmits;         /* tcp_retransmit_skb events */
    u64 synack_retransmits;  /* tcp_retransmit_synack events */
    u64 first_ns;            /* CLOCK_MONOTONIC(_COARSE) time of the first event */
    u64 last_ns;             /* ... of the latest event */
    u32 last_state;          /* TCP state at the latest event */
    u32 pad;
    u64 by_cause[CAUSE_SLOTS];  /* retransmits + SYN-ACK retransmits (CAUSE_UNKNOWN) per CAUSE_* */
    struct sock_info sock;   /* the socket at the latest event */
};

/* A run: consecutive retransmits of one flow on one CPU, not yet added to flows4/6.
 * Retransmits come in bursts per socket, so most events only bump `retransmits` here, an
 * inlined per-CPU array access instead of hash and trie lookups (the flow filters are
 * skipped too: the run's flow passed them). Each CPU keeps RUN_SLOTS runs, one per slot
 * chosen by the socket's address: bursts of two sockets that interleave on a CPU then
 * need no flow map update between them (a flow map update costs about as much as the
 * rest of the program). A run is added to the flow map when another socket takes its
 * slot or the filters change; the agent adds pending runs when it reads. */
#ifndef RUN_SLOTS
#define RUN_SLOTS 2            /* a power of two */
#endif

struct run {
    struct flow_key key;
    u64 sk;                /* the socket (skaddr): an event continues the run when it has the
                              same socket, ports and low 4 bytes of both addresses */
    u32 saddr_tail;        /* the low 4 bytes of saddr_v6, daddr_v6 */
    u32 daddr_tail;
    u32 last_state;
    u32 generation;        /* config.generation when the run started */
    u64 cgroup;            /* the flow's cgroup id (its flow map entry's, else the socket's) */
    u64 retransmits;       /* 0: no run pending */
    u64 first_ns;          /* time of the run's first event (see struct clock) */
    u64 last_ns;           /* ... of its latest event */
    u64 by_cause[CAUSE_SLOTS];
    struct sock_info sock; /* at the run's latest event */
    u64 read_ns;           /* when sock's statistics were read (see SOCK_READ_INTERVAL_NS) */
};

/* Per CPU: jiffies -> ns calibration, so most events need bpf_jiffies64() (a load) rather
 * than bpf_ktime_get_ns() (a clock read; tracing programs may not use the coarse clock).
 * Event times are CLOCK_MONOTONIC within about two jiffies. */
struct clock {
    u64 base_ns;           /* the clock at this CPU's first event */
    u64 base_jiffies;
    u64 ns_per_jiffy;
    u64 calibrate_at;      /* jiffies since the base at which to calibrate again; 0: events
                              read the clock until 16 jiffies have passed */
};

/* Per-CPU exact totals: every event that passed the filters, whatever the flow maps
 * and the sample path did with it. */
struct totals {
    u64 retransmits;
    u64 synack_retransmits;
    u64 sampled;               /* samples handed to the ring/perf buffer */
    u64 lost;                  /* samples dropped: rate limit or full buffer */
    u64 failed;                /* failed retransmit attempts (err != 0, Linux 6.17+), before
                                  any filter; counted nowhere else: older kernels never report them */
    u64 by_state[STATE_SLOTS]; /* retransmits + synack retransmits per TCP state */
    u64 by_cause[CAUSE_SLOTS]; /* retransmits + SYN-ACK retransmits per CAUSE_*; SYN-ACKs are CAUSE_UNKNOWN */
    u64 owners_full;           /* retransmits + SYN-ACK retransmits no `owners` entry took: the
                                  map was full (OWNER_CAPACITY addresses) */
};

/* `owners`: retransmits per local (retransmitting) address and socket cgroup, whatever the
 * flow maps evict: the agent sums them per pod (by cgroup where the address is shared: a
 * node address of hostNetwork pods and node processes). IPv4 addresses occupy the first 4
 * bytes of addr; cgroup 0 where none was read. */
struct owner_key {
    u16 family;            /* AF_INET_ or AF_INET6_ */
    u16 pad;
    u8 addr[16];
    u32 pad2;
    u64 cgroup;
};

struct owner_counts {
    u64 retransmits;
    u64 synack_retransmits;
};

/* Global one-second sampling window (shared by all CPUs). */
struct sample_window {
    u64 start_ns;
    u64 count;
};

struct cidr4_key {
    u32 prefixlen;
    u8 addr[4];
};

struct cidr6_key {
    u32 prefixlen;
    u8 addr[16];
};

struct ip6_addr {
    u8 addr[16];
};

/* One sampled event. IPv4 addresses occupy the first 4 bytes of saddr/daddr. */
struct event {
    u64 ts_ns;
    u16 family;
    u8 kind;               /* KIND_* */
    u8 state;
    u16 sport;
    u16 dport;
    u8 saddr[16];
    u8 daddr[16];
};

#endif /* RETRANSMIT_H */
