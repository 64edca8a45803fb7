/* Count TCP retransmits per flow in the kernel, with exact totals and rate-limited samples.
 *
 * Hooks: tracepoints tcp:tcp_retransmit_skb and tcp:tcp_retransmit_synack. Only tracepoint
 * fields are read (bcc builds `args` from the tracefs format file), so the program follows
 * the running kernel's layout and needs no struct sock.
 *
 * Cost per event is kept near a bare counter's (bench/results/kernel_breakdown.md prices
 * each part): filters are skipped unless enabled, flow keys are small (one map per
 * family), and consecutive retransmits of one flow on a CPU
 * (the common case: they come in bursts) are counted in a per-CPU run, recognised by its
 * socket pointer, without parsing addresses, a hash lookup or a clock read (see struct run
 * and struct clock in retransmit.h).
 *
 * Both families take one code path: an event becomes a struct flow_key (IPv4 addresses in
 * its first 4 bytes); only the maps keyed by address are per family, and lookup_flow,
 * insert_flow and addresses_pass pick the map by key.family.
 *
 * Only the fields every kernel since 4.15 has are assumed: skaddr, sport, dport, saddr,
 * daddr, saddr_v6, daddr_v6. Compile-time switches (cflags), chosen by the agent from the
 * running kernel's format files and helper probes (agent/kernelinfo.py):
 *   HAVE_SKB_STATE  tcp_retransmit_skb has `state` (Linux 5.0+); else state UNKNOWN (0)
 *   HAVE_SKB_ERR    ... has `err` (6.17+): it then also fires for failed attempts, which
 *                   are set aside so every kernel counts the same thing
 *   HAVE_JIFFIES64  bpf_jiffies64() exists (5.5+): events estimate time without the clock
 *   USE_RINGBUF     BPF ring buffer (5.8+, RHEL 8.4+), else a perf buffer
 *   HAVE_SOCK_BTF   the node's BTF gave the socket fields' offsets (SOCK_* constants):
 *                   each retransmit gets a cause and the flow the socket's RTT and window
 *   HAVE_SOCK_SEGS  ... and of tcp_sock's data_segs_out and total_retrans: the flow carries
 *                   the segments its connection sent and retransmitted (the kernel's ratio)
 *   HAVE_PROBE_READ_KERNEL  bpf_probe_read_kernel() (5.5+), else bpf_probe_read()
 *   HAVE_SOCK_CGROUP  the node's BTF gave the path sock -> cgroup v2 -> kernfs node -> id
 *                   (SOCK_CGROUP, SOCK_CGROUP_VAL, CGROUP_KN, KERNFS_NODE_ID): each new flow
 *                   carries its socket's cgroup id, read once when the flow enters the map
 * and FLOW_CAPACITY, OWNER_CAPACITY, RINGBUF_PAGES, FILTER_CAPACITY. Run-time configuration: the maps `config`, `ports`,
 * `cidrs4`, `cidrs6`, `local4`, `local6`, `cgroups`, filled by the agent.
 * WITHOUT_FILTERS, WITHOUT_FLOWS, WITHOUT_SAMPLES, WITHOUT_SOCK_STATS leave a part out, so
 * bench/kernel_breakdown.py can price each part in one run; the agent never sets them.
 */
#include "retransmit.h"

BPF_ARRAY(config, struct config, 1);
BPF_ARRAY(ports, u8, 65536);   /* indexed by port: an inlined lookup, not a hash */
BPF_LPM_TRIE(cidrs4, struct cidr4_key, u8, FILTER_CAPACITY);
BPF_LPM_TRIE(cidrs6, struct cidr6_key, u8, FILTER_CAPACITY);
BPF_HASH(local4, u32, u8, FILTER_CAPACITY);
BPF_HASH(local6, struct ip6_addr, u8, FILTER_CAPACITY);
/* Selected cgroup ids (hostNetwork pods' containers): consulted only for flows whose local
 * address is a node address (local4/6 value LOCAL_NODE), where the address cannot tell. */
BPF_HASH(cgroups, u64, u8, FILTER_CAPACITY);

/* Small keys per family: hashing a 12-byte key is much cheaper than a 40-byte one. */
BPF_TABLE("lru_hash", struct flow_key4, struct flow_stats, flows4, FLOW_CAPACITY);
BPF_TABLE("lru_hash", struct flow_key6, struct flow_stats, flows6, FLOW_CAPACITY);

/* Plain hash, not LRU: an evicted address would lose its pod's count. Bounded by
 * OWNER_CAPACITY (the addresses a node's pods and the node itself can hold); past it the
 * retransmits are counted in totals.owners_full. */
BPF_HASH(owners, struct owner_key, struct owner_counts, OWNER_CAPACITY);

BPF_PERCPU_ARRAY(totals, struct totals, 1);
BPF_PERCPU_ARRAY(runs, struct run, RUN_SLOTS);
BPF_PERCPU_ARRAY(clock, struct clock, 1);
BPF_ARRAY(sample_window, struct sample_window, 1);

#ifdef USE_RINGBUF
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
#endif

/* Add `add`'s counts to a flow's entry. Atomic adds: two CPUs may flush runs of the same
 * flow at once (the socket moved between CPUs). */
static __always_inline void merge_stats(struct flow_stats *stats, struct flow_stats *add)
{
    if (add->retransmits)
        __sync_fetch_and_add(&stats->retransmits, add->retransmits);
    if (add->synack_retransmits)
        __sync_fetch_and_add(&stats->synack_retransmits, add->synack_retransmits);
#pragma unroll
    for (int i = 0; i < CAUSE_SLOTS; i++)
        if (add->by_cause[i])
            __sync_fetch_and_add(&stats->by_cause[i], add->by_cause[i]);
    if (add->last_ns > stats->last_ns) {
        stats->last_ns = add->last_ns;
        stats->last_state = add->last_state;
        if (add->sock.valid)
            stats->sock = add->sock;
    }
}

/* The family's flow map key of `key` (flows4 or flows6). */
static __always_inline void key4(struct flow_key *key, struct flow_key4 *k)
{
    __builtin_memcpy(&k->saddr, key->saddr, 4);
    __builtin_memcpy(&k->daddr, key->daddr, 4);
    k->sport = key->sport;
    k->dport = key->dport;
}

static __always_inline void key6(struct flow_key *key, struct flow_key6 *k)
{
    __builtin_memcpy(k->saddr, key->saddr, 16);
    __builtin_memcpy(k->daddr, key->daddr, 16);
    k->sport = key->sport;
    k->dport = key->dport;
}

static __always_inline struct flow_stats *lookup_flow(struct flow_key *key)
{
    if (key->family == AF_INET_) {
        struct flow_key4 k = {};
        key4(key, &k);
        return flows4.lookup(&k);
    }
    struct flow_key6 k = {};
    key6(key, &k);
    return flows6.lookup(&k);
}

/* 0 when inserted. `add` is on the stack: before Linux 4.18 a helper's value must be. */
static __always_inline int insert_flow(struct flow_key *key, struct flow_stats *add)
{
    if (key->family == AF_INET_) {
        struct flow_key4 k = {};
        key4(key, &k);
        return flows4.insert(&k, add);
    }
    struct flow_key6 k = {};
    key6(key, &k);
    return flows6.insert(&k, add);
}

/* Add counts to the local address's `owners` entry. Called where counts enter the flow maps
 * (add_to_flow), so every counted event reaches it once: a run's events when the run is
 * flushed (the agent adds pending runs, as for flows), a SYN-ACK at once. Not per event: the
 * run path stays a per-CPU increment. */
static __always_inline void add_to_owner(struct flow_key *key, struct flow_stats *add)
{
    struct owner_key k = {.family = key->family, .cgroup = add->cgroup};
    __builtin_memcpy(k.addr, key->saddr, 16);
    struct owner_counts *counts = owners.lookup(&k);
    if (!counts) {
        struct owner_counts fresh = {.retransmits = add->retransmits,
                                     .synack_retransmits = add->synack_retransmits};
        if (owners.insert(&k, &fresh) == 0)
            return;
        counts = owners.lookup(&k);   /* another CPU inserted it first, or the map is full */
        if (!counts) {
            u32 zero = 0;
            struct totals *t = totals.lookup(&zero);
            if (t)
                t->owners_full += add->retransmits + add->synack_retransmits;
            return;
        }
    }
    if (add->retransmits)
        __sync_fetch_and_add(&counts->retransmits, add->retransmits);
    if (add->synack_retransmits)
        __sync_fetch_and_add(&counts->synack_retransmits, add->synack_retransmits);
}

/* Add counts to a flow's map entry: inserted whole on first sight (a reader never sees a
 * half-made entry), else merged into the entry found; and to its local address's total. */
static __always_inline void add_to_flow(struct flow_key *key, struct flow_stats *add)
{
    add_to_owner(key, add);
    struct flow_stats *stats = lookup_flow(key);
    if (!stats) {
        if (insert_flow(key, add) == 0)
            return;
        stats = lookup_flow(key);   /* another CPU inserted it first */
        if (!stats)
            return;
    }
    merge_stats(stats, add);
}

#ifdef HAVE_SOCK_CGROUP
#ifdef HAVE_PROBE_READ_KERNEL
#define read_cgroup_ptr bpf_probe_read_kernel
#else
#define read_cgroup_ptr bpf_probe_read          /* before Linux 5.5 */
#endif
/* The cgroup v2 id of socket `sk` (kernfs_node.id of sk->sk_cgrp_data's cgroup, the inode of
 * its cgroup2 directory), through offsets from the node's BTF; 0 when unreadable. Three
 * reads: called once per new flow (and per filtered run start of a node address), never on
 * the per-event path. SOCK_CGROUP_VAL: the layout before 5.15, a u64 `val` that holds the
 * cgroup pointer unless one of its two low bits is set (net_cls/net_prio v1 data in its
 * place: the kernel then files the socket under the root cgroup too). */
static __always_inline u64 sock_cgroup(const void *sk)
{
    const char *base = sk;
    u64 cgrp = 0, kn = 0, id = 0;
    if (read_cgroup_ptr(&cgrp, 8, base + SOCK_CGROUP) || !cgrp)
        return 0;
#ifdef SOCK_CGROUP_VAL
    if (cgrp & 3)
        return 0;
#endif
    if (read_cgroup_ptr(&kn, 8, (const char *)cgrp + CGROUP_KN) || !kn)
        return 0;
    if (read_cgroup_ptr(&id, 8, (const char *)kn + KERNFS_NODE_ID))
        return 0;
    return id;
}

/* The cgroup id a new run of `key` carries: its flow map entry's (read once, when the flow
 * entered the map), else the socket's. `known`: already read (by the cgroup filter). */
static __always_inline u64 flow_cgroup(struct flow_key *key, const void *sk, u64 known)
{
    if (known)
        return known;
    struct flow_stats *stats = lookup_flow(key);
    if (stats)
        return stats->cgroup;
    return sock_cgroup(sk);
}
#endif

/* The address filters (remote CIDRs, local addresses): lookups in the family's maps. A node
 * address (LOCAL_NODE) passes when the socket's cgroup is selected; `*cgroup` then holds it. */
static __always_inline int addresses_pass(struct config *cfg, struct flow_key *key, const void *sk, u64 *cgroup)
{
    u8 *local = 0;
    if (key->family == AF_INET_) {
        if (cfg->cidrs_enabled) {
            struct cidr4_key c = {.prefixlen = 32};
            __builtin_memcpy(c.addr, key->daddr, 4);
            if (!cidrs4.lookup(&c))
                return 0;
        }
        if (!cfg->local_ips_enabled)
            return 1;
        u32 saddr;
        __builtin_memcpy(&saddr, key->saddr, 4);
        local = local4.lookup(&saddr);
    } else {
        if (cfg->cidrs_enabled) {
            struct cidr6_key c = {.prefixlen = 128};
            __builtin_memcpy(c.addr, key->daddr, 16);
            if (!cidrs6.lookup(&c))
                return 0;
        }
        if (!cfg->local_ips_enabled)
            return 1;
        local = local6.lookup((struct ip6_addr *)key->saddr);
    }
    if (!local)
        return 0;
    if (*local != LOCAL_NODE)
        return 1;
#ifdef HAVE_SOCK_CGROUP
    if (!cfg->cgroups_enabled || !sk)
        return 0;
    u64 id = flow_cgroup(key, sk, 0);
    *cgroup = id;
    return id && cgroups.lookup(&id) != 0;
#else
    return 0;
#endif
}

/* ---- the clock ------------------------------------------------------------------------- */

#ifdef HAVE_JIFFIES64
/* An event's time: estimated from jiffies (a load) once this CPU's calibration against
 * bpf_ktime_get_ns() (a clock read) holds, else read from the clock. The calibration is
 * redone each time the span since the base doubles, so the estimate stays within about two
 * jiffies of the clock at a clock read per doubling; per CPU, so no cache line moves. */
static __always_inline u64 now_ns(struct clock *clk)
{
    u64 jiffies = bpf_jiffies64();
    u64 span = jiffies - clk->base_jiffies;
    if (span < clk->calibrate_at)
        return clk->base_ns + span * clk->ns_per_jiffy;
    u64 now = bpf_ktime_get_ns();
    if (!clk->base_ns) {
        clk->base_ns = now;
        clk->base_jiffies = jiffies;
    } else if (span >= 16) {
        clk->ns_per_jiffy = (now - clk->base_ns) / span;
        clk->calibrate_at = span * 2;
    }
    return now;
}
#else
/* No bpf_jiffies64() (before Linux 5.5): every event reads the clock. */
static __always_inline u64 now_ns(struct clock *clk)
{
    return bpf_ktime_get_ns();
}
#endif

/* ---- per-CPU runs ----------------------------------------------------------------------- */

/* The slot of socket `sk` among this CPU's runs (tcp_sock objects are cache-line aligned). */
static __always_inline u32 run_slot(const void *sk)
{
    u64 p = (u64)sk;
    return ((p >> 6) ^ (p >> 12)) & (RUN_SLOTS - 1);
}

/* Whether a retransmit continues the run in its socket's slot: the same socket (a pointer compare, so
 * the common event parses no address), with the same ports and the same low 4 bytes of
 * both addresses (in case the socket's memory went to another connection meanwhile), under
 * the same filters (the run's flow passed the flow filters of its generation). A macro:
 * bcc defines the type of `args` only inside the probe. */
#define CONTINUES_RUN(run, args, current)                                        \
    ({                                                                           \
        u32 saddr_tail, daddr_tail;                                              \
        __builtin_memcpy(&saddr_tail, (args)->saddr_v6 + 12, 4);                 \
        __builtin_memcpy(&daddr_tail, (args)->daddr_v6 + 12, 4);                 \
        (run)->retransmits && (run)->sk == (u64)(args)->skaddr &&                \
            (run)->generation == (current) &&                                    \
            (run)->key.sport == (args)->sport &&                                 \
            (run)->key.dport == (args)->dport &&                                 \
            (run)->saddr_tail == saddr_tail && (run)->daddr_tail == daddr_tail;  \
    })

static __always_inline void extend_run(struct run *run, u32 state, u8 cause, struct sock_info *sock,
                                       u64 now)
{
    run->retransmits++;
    run->by_cause[cause & (CAUSE_SLOTS - 1)]++;
    run->last_ns = now;
    run->last_state = state;
    /* the run's socket statistics are those of its latest read (see read_sock_stats) */
    run->sock.ca_state = sock->ca_state;
    run->sock.timeouts = sock->timeouts;
}

/* Whether a run's socket statistics are due for another read at `now`. Signed: per-CPU
 * times estimated from jiffies may step back a little when the clock is calibrated. */
static __always_inline int sock_read_due(struct run *run, u64 now)
{
    return (s64)(now - run->read_ns) >= (s64)SOCK_READ_INTERVAL_NS;
}

/* Move the run in this slot into the flow map and start a new one: flow `key` on socket `sk`. */
static __always_inline void start_run(struct run *run, struct flow_key *key, const void *sk,
                                      u32 state, u32 generation, u8 cause, struct sock_info *sock,
                                      u64 now, u64 cgroup)
{
    if (run->retransmits) {
        struct flow_key done = run->key;
        struct flow_stats add = {.cgroup = run->cgroup, .retransmits = run->retransmits, .first_ns = run->first_ns,
                                 .last_ns = run->last_ns, .last_state = run->last_state,
                                 .sock = run->sock};
        __builtin_memcpy(add.by_cause, run->by_cause, sizeof(add.by_cause));
        add_to_flow(&done, &add);
    }
    run->key = *key;
    run->sk = (u64)sk;
    /* the low 4 bytes of saddr_v6 and daddr_v6, as continues_run reads them */
    u32 tail = key->family == AF_INET_ ? 0 : 12;
    __builtin_memcpy(&run->saddr_tail, key->saddr + tail, 4);
    __builtin_memcpy(&run->daddr_tail, key->daddr + tail, 4);
    run->generation = generation;
    run->cgroup = cgroup;
    run->retransmits = 1;
    __builtin_memset(run->by_cause, 0, sizeof(run->by_cause));
    run->by_cause[cause & (CAUSE_SLOTS - 1)] = 1;
    run->first_ns = now;
    run->last_ns = now;
    run->last_state = state;
    run->sock = *sock;
    run->read_ns = now;
}

static __always_inline void fill_event(struct event *e, struct flow_key *key, u8 kind, u32 state,
                                       u64 now)
{
    e->ts_ns = now;
    e->family = key->family;
    e->kind = kind;
    e->state = state;
    e->sport = key->sport;
    e->dport = key->dport;
    __builtin_memcpy(e->saddr, key->saddr, 16);
    __builtin_memcpy(e->daddr, key->daddr, 16);
}

/* Hand one sample to user space unless the per-second budget is spent (the common case:
 * then only the shared window is read, and the event is counted as lost). */
static __always_inline void sample(void *ctx, struct config *cfg, struct totals *t,
                                   struct flow_key *key, u8 kind, u32 state, u64 now)
{
    u32 zero = 0;
    struct sample_window *w = sample_window.lookup(&zero);
    if (!w)
        return;
    /* Signed: event times estimated from jiffies may trail another CPU's clock read. */
    if ((s64)(now - w->start_ns) >= 1000000000LL) {
        /* Racy between CPUs by design: the budget may be exceeded by a few samples. */
        w->start_ns = now;
        w->count = 0;
    }
    if (w->count >= cfg->max_per_second) {
        t->lost++;
        return;
    }
    __sync_fetch_and_add(&w->count, 1);
#ifdef USE_RINGBUF
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    if (!e) {
        t->lost++;
        return;
    }
    fill_event(e, key, kind, state, now);
    /* No wake-up per event: the agent drains the buffer on a timer. */
    events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
    t->sampled++;
#else
    struct event ev = {};
    fill_event(&ev, key, kind, state, now);
    if (events.perf_submit(ctx, &ev, sizeof(ev)) < 0)
        t->lost++;
    else
        t->sampled++;
#endif
}

static __always_inline void count_totals(struct totals *t, u8 kind, u32 slot, u8 cause)
{
    if (kind == KIND_SYNACK)
        t->synack_retransmits++;
    else
        t->retransmits++;
    t->by_state[slot & (STATE_SLOTS - 1)]++;
    t->by_cause[cause & (CAUSE_SLOTS - 1)]++;
}

/* The cause of a retransmit from the socket's congestion-avoidance state (see CAUSE_*). */
static __always_inline u8 cause_of(struct sock_info *sock, u32 state)
{
    if (!sock->valid)
        return CAUSE_UNKNOWN;
    if (state == TCP_SYN_SENT_ || sock->ca_state == 4)    /* TCP_CA_Loss */
        return CAUSE_TIMEOUT;
    if (sock->ca_state >= 2)                               /* TCP_CA_Recovery, TCP_CA_CWR */
        return CAUSE_FAST;
    return CAUSE_PROBE;                                    /* TCP_CA_Open, TCP_CA_Disorder */
}

#ifdef HAVE_SOCK_BTF
#ifdef HAVE_PROBE_READ_KERNEL
#define read_kernel bpf_probe_read_kernel
#else
#define read_kernel bpf_probe_read          /* before Linux 5.5 */
#endif
/* Per event: the fields behind the cause and the black-hole signal, at offsets the agent
 * resolved from this kernel's BTF (SOCK_*). One helper call when they are adjacent, as in
 * every kernel so far: a bpf_probe_read costs about as much as the rest of the program. */
static __always_inline void read_sock_state(const void *sk, struct sock_info *sock)
{
    const char *base = sk;
#if SOCK_RETRANSMITS == SOCK_CA_STATE_BYTE + 1
    u8 both[2] = {};
    if (read_kernel(both, 2, base + SOCK_CA_STATE_BYTE))
        return;   /* valid stays 0: cause unknown */
    u8 ca = both[0];
    sock->timeouts = both[1];
#else
    u8 ca = 0;
    if (read_kernel(&ca, 1, base + SOCK_CA_STATE_BYTE) ||
        read_kernel(&sock->timeouts, 1, base + SOCK_RETRANSMITS))
        return;
#endif
    sock->ca_state = (ca >> SOCK_CA_STATE_SHIFT) & SOCK_CA_STATE_MASK;
    sock->valid = 1;
}

#define MIN2(a, b) ((a) < (b) ? (a) : (b))
#define MAX2(a, b) ((a) > (b) ? (a) : (b))
#define SOCK_STATS_FIRST MIN2(MIN2(SOCK_SRTT_US, SOCK_SND_CWND), MIN2(SOCK_PACKETS_OUT, SOCK_RETRANS_OUT))
#define SOCK_STATS_SPAN (MAX2(MAX2(SOCK_SRTT_US, SOCK_SND_CWND), MAX2(SOCK_PACKETS_OUT, SOCK_RETRANS_OUT)) \
                         + 4 - SOCK_STATS_FIRST)

/* The connection's segment counters, data_segs_out and total_retrans (HAVE_SOCK_SEGS):
 * both are counted before the tracepoint fires, so a read includes the event being handled.
 * Two reads of 4 bytes: in 6.x kernels they lie 660 bytes apart, far from the fields below. */
static __always_inline void read_sock_segs(const void *sk, struct sock_info *sock)
{
#ifdef HAVE_SOCK_SEGS
    const char *base = sk;
    u32 sent = 0, retransmitted = 0;
    if (read_kernel(&sent, 4, base + SOCK_DATA_SEGS_OUT) ||
        read_kernel(&retransmitted, 4, base + SOCK_TOTAL_RETRANS))
        return;   /* a failed read changes nothing shown: never half of a pair */
    sock->data_segs_out = sent;
    sock->total_retrans = retransmitted;
    sock->segs_valid = 1;
#endif
}

/* At the first retransmit of a run (a burst of one flow on one CPU), and again at a
 * retransmit of the run once SOCK_READ_INTERVAL_NS has passed since: RTT, window, segments
 * in flight and the segment counters. Not per event, to keep the cost per event low (a
 * time compare); in one bpf_probe_read when the four fields lie within 256 bytes (they do
 * in 5.x-6.x kernels): a call costs about as much as copying a few hundred bytes. */
#if SOCK_STATS_SPAN <= 256
struct sock_span {
    u8 bytes[256];
};
BPF_PERCPU_ARRAY(sock_scratch, struct sock_span, 1);   /* too big for the stack */

static __always_inline u32 span_u32(struct sock_span *span, u32 offset)
{
    u32 value;
    __builtin_memcpy(&value, span->bytes + (offset - SOCK_STATS_FIRST), 4);
    return value;
}

static __always_inline void read_sock_stats(const void *sk, struct sock_info *sock)
{
    const char *base = sk;
    u32 zero = 0;
    struct sock_span *span = sock_scratch.lookup(&zero);
    if (!span || read_kernel(span->bytes, SOCK_STATS_SPAN, base + SOCK_STATS_FIRST))
        return;
    sock->srtt_us = span_u32(span, SOCK_SRTT_US) >> 3;   /* the kernel keeps srtt_us scaled by 8 */
    sock->snd_cwnd = span_u32(span, SOCK_SND_CWND);
    sock->packets_out = span_u32(span, SOCK_PACKETS_OUT);
    sock->retrans_out = span_u32(span, SOCK_RETRANS_OUT);
    read_sock_segs(sk, sock);
}
#else
static __always_inline void read_sock_stats(const void *sk, struct sock_info *sock)
{
    const char *base = sk;
    u32 srtt = 0;
    if (read_kernel(&srtt, 4, base + SOCK_SRTT_US) ||
        read_kernel(&sock->snd_cwnd, 4, base + SOCK_SND_CWND) ||
        read_kernel(&sock->packets_out, 4, base + SOCK_PACKETS_OUT) ||
        read_kernel(&sock->retrans_out, 4, base + SOCK_RETRANS_OUT))
        return;
    sock->srtt_us = srtt >> 3;   /* the kernel keeps srtt_us scaled by 8 */
    read_sock_segs(sk, sock);
}
#endif
#endif

/* Count an event that passed the filters in the totals, and sample it. */
static __always_inline int count_event(void *ctx, struct config *cfg, struct totals *t,
                                       struct flow_key *key, u8 kind, u32 state, u8 cause, u64 now)
{
    count_totals(t, kind, state, cause);
#ifndef WITHOUT_SAMPLES
    if (cfg->max_per_second)
        sample(ctx, cfg, t, key, kind, state, now);
#endif
    return 0;
}

/* An event that does not continue this CPU's run (a SYN-ACK never does): filter its flow,
 * then start a run with it or add it to the flow map. `key` is the event's flow, `state`
 * its slot (< STATE_SLOTS). */
static __always_inline int handle(void *ctx, struct flow_key *key, u8 kind, u32 state,
                                  const void *sk, struct sock_info *sock)
{
    u32 zero = 0;
    struct config *cfg = config.lookup(&zero);
    struct totals *t = totals.lookup(&zero);
    struct clock *clk = clock.lookup(&zero);
    u32 slot = run_slot(sk);
    struct run *run = runs.lookup(&slot);
    if (!cfg || !t || !clk || !run)
        return 0;
    u64 cgroup = 0;   /* the flow's cgroup id, once read (HAVE_SOCK_CGROUP) */

#ifndef WITHOUT_FILTERS
    /* Cheap filters first: a bit test and an array index. */
    if (!(cfg->families & (key->family == AF_INET_ ? FAMILY_IPV4 : FAMILY_IPV6)))
        return 0;
    if (cfg->states && !(cfg->states & (1U << state)))
        return 0;
    if (cfg->ports_enabled) {
        u32 sport = key->sport, dport = key->dport;
        u8 *s = ports.lookup(&sport), *d = ports.lookup(&dport);
        if (!(s && *s) && !(d && *d))
            return 0;
    }
    if (!addresses_pass(cfg, key, sk, &cgroup))
        return 0;
#endif
    u8 cause = cause_of(sock, state);
    u64 now = 0;
#ifndef WITHOUT_FLOWS
    now = now_ns(clk);
    if (kind == KIND_SYNACK) {   /* rare: straight into the flow map */
        struct flow_stats add = {.synack_retransmits = 1, .first_ns = now,
                                 .last_ns = now, .last_state = state};
        add.by_cause[CAUSE_UNKNOWN] = 1;
        add_to_flow(key, &add);
    } else {
#if defined(HAVE_SOCK_BTF) && !defined(WITHOUT_SOCK_STATS)
        if (sock->valid)
            read_sock_stats(sk, sock);
#endif
#ifdef HAVE_SOCK_CGROUP
        cgroup = flow_cgroup(key, sk, cgroup);
#endif
        start_run(run, key, sk, state, cfg->generation, cause, sock, now, cgroup);
    }
#endif
    return count_event(ctx, cfg, t, key, kind, state, cause, now);
}

/* The flow of an event, from the fields every kernel since 4.15 has (constant-offset
 * context reads only). An IPv4 connection has a v4-mapped daddr_v6 (::ffff:a.b.c.d) on
 * every kernel: the tracepoints store an AF_INET socket's addresses that way, and an
 * AF_INET6 socket talking IPv4 (a dual-stack server on [::]) has them so. The `family`
 * field (5.12+) says the socket's family, which for the latter is AF_INET6: the wire's
 * family comes from here. The family is told first, so an IPv4 event copies only its
 * 4-byte addresses (into the first 4 bytes). `key` starts zeroed. */
#define READ_FLOW(key, args)                                                     \
    do {                                                                         \
        u64 prefix;                                                              \
        u16 zero16, ones16;                                                      \
        __builtin_memcpy(&prefix, (args)->daddr_v6, 8);                          \
        __builtin_memcpy(&zero16, (args)->daddr_v6 + 8, 2);                      \
        __builtin_memcpy(&ones16, (args)->daddr_v6 + 10, 2);                     \
        (key).sport = (args)->sport;                                             \
        (key).dport = (args)->dport;                                             \
        if (prefix == 0 && zero16 == 0 && ones16 == 0xffff) {                    \
            (key).family = AF_INET_;                                             \
            __builtin_memcpy((key).saddr, (args)->saddr_v6 + 12, 4);             \
            __builtin_memcpy((key).daddr, (args)->daddr_v6 + 12, 4);             \
        } else {                                                                 \
            (key).family = AF_INET6_;                                            \
            __builtin_memcpy((key).saddr, (args)->saddr_v6, 16);                 \
            __builtin_memcpy((key).daddr, (args)->daddr_v6, 16);                 \
        }                                                                        \
    } while (0)

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
    u32 zero = 0;
#ifdef HAVE_SKB_ERR
    if (args->err) {
        struct totals *t = totals.lookup(&zero);
        if (t)
            t->failed++;
        return 0;
    }
#endif
    u32 state = 0;   /* without the field: filed under UNKNOWN (the agent refuses a states filter there) */
#ifdef HAVE_SKB_STATE
    int s = args->state;
    state = (s > 0 && s < STATE_SLOTS) ? s : 0;
    /* Hide the range from the compiler, so it keeps the masks that prove it to the verifier. */
    asm volatile("" : "+r"(state));
#endif
    struct sock_info sock = {};
#ifdef HAVE_SOCK_BTF
    read_sock_state(args->skaddr, &sock);
#endif
#ifndef WITHOUT_FLOWS
    /* The common case: the event continues this CPU's run, whose flow passed the filters
     * (only the state, which changes, is checked again). */
    struct config *cfg = config.lookup(&zero);
    struct totals *t = totals.lookup(&zero);
    struct clock *clk = clock.lookup(&zero);
    u32 slot = run_slot(args->skaddr);
    struct run *run = runs.lookup(&slot);
    if (!cfg || !t || !clk || !run)
        return 0;
    if (CONTINUES_RUN(run, args, cfg->generation)) {
#ifndef WITHOUT_FILTERS
        if (cfg->states && !(cfg->states & (1U << state)))
            return 0;
#endif
        u8 cause = cause_of(&sock, state);
        u64 now = now_ns(clk);
        extend_run(run, state, cause, &sock, now);
#if defined(HAVE_SOCK_BTF) && !defined(WITHOUT_SOCK_STATS)
        if (sock.valid && sock_read_due(run, now)) {
            read_sock_stats(args->skaddr, &run->sock);
            run->read_ns = now;
        }
#endif
        return count_event(args, cfg, t, &run->key, KIND_RETRANSMIT, state, cause, now);
    }
#endif
    struct flow_key key = {};
    READ_FLOW(key, args);
    return handle(args, &key, KIND_RETRANSMIT, state, args->skaddr, &sock);
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_synack)
{
    struct flow_key key = {};
    READ_FLOW(key, args);
    struct sock_info sock = {};   /* a request socket: cause unknown */
    /* A request socket is no full socket: no cgroup read (0; the node address filter with
     * cgroups leaves its SYN-ACKs out, unselected as unknown). */
    return handle(args, &key, KIND_SYNACK, TCP_SYN_RECV_, 0, &sock);
}

#ifdef HAVE_DROP_REASONS
/* ---- drops: the kernel's drops of TCP packets of the traced flows, per flow and per reason.
 *
 * The part of this file compiled with HAVE_DROP_REASONS, when the kernel's
 * skb:kfree_skb has a `reason` field (Linux 5.17+), its BTF gives struct sk_buff's offsets,
 * and the trace did not turn drops off (spec.drops). It shares the filter maps (config,
 * ports, cidrs4/6, local4/6) with the retransmit program, so a drop counts when its flow
 * would count as a retransmitting one.
 *
 * kfree_skb fires for every freed-as-dropped packet on the node, far more often than a
 * retransmit: the cheap tests come first. The tracepoint's `protocol` (no memory read)
 * leaves IPv4 and IPv6; one read of struct sk_buff and one of the IP header leave TCP;
 * then the flow filters. Normal frees go through consume_skb (a tracepoint of its own), but
 * kfree_skb() calls without a reason still report NOT_SPECIFIED, and on Linux 6.18 a TCP
 * sender's incoming ACKs do so with no loss anywhere: NOT_SPECIFIED is no evidence of a
 * drop, and is left out first, before anything is read.
 *
 * Which end is local: a packet the node received (skb_iif set by the receive path) is an
 * inbound drop to its destination, else an outbound drop from its source. With a local-IP
 * filter (the trace's pods) the end in the filter is the local one, whatever the path; a
 * packet whose both ends are traced (two pods of one node) counts at the end the direction
 * names.
 */
#include "drops.h"

/* bcc declares the tracepoint's `reason` as `enum skb_drop_reason`, which the generic headers
 * bcc compiles against do not define (the program includes none of the kernel's networking
 * headers): defined here as what the format file says it is, a 4-byte value. Its values
 * are never used in C: the agent names them from the node's BTF. */
enum skb_drop_reason { RTRACE_SKB_DROP_REASON_SIZE_ = 0x7fffffff };

BPF_TABLE("lru_hash", struct drop_key, u64, drops, DROP_FLOW_CAPACITY);
BPF_PERCPU_ARRAY(drop_totals, u64, DROP_REASON_SLOTS);   /* exact, by reason: every counted drop */

#define IPPROTO_TCP_ 6

/* The struct sk_buff fields behind an skb's IP header: one read when they lie close together
 * (56 bytes on 6.18), else one read each. */
#define SKB_MIN3(a, b, c) ((a) < (b) ? ((a) < (c) ? (a) : (c)) : ((b) < (c) ? (b) : (c)))
#define SKB_MAX3(a, b, c) ((a) > (b) ? ((a) > (c) ? (a) : (c)) : ((b) > (c) ? (b) : (c)))
#define SKB_SPAN_FIRST SKB_MIN3(SKB_IIF, SKB_NETWORK_HEADER, SKB_HEAD)
#define SKB_SPAN_SIZE (SKB_MAX3(SKB_IIF + 4, SKB_NETWORK_HEADER + 2, SKB_HEAD + 8) - SKB_SPAN_FIRST)

static __always_inline int read_skb(const char *skb, u32 *iif, u16 *network_header, const char **head)
{
#if SKB_SPAN_SIZE <= 64
    u8 span[64];
    if (bpf_probe_read_kernel(span, SKB_SPAN_SIZE, skb + SKB_SPAN_FIRST))
        return -1;
    __builtin_memcpy(iif, span + (SKB_IIF - SKB_SPAN_FIRST), 4);
    __builtin_memcpy(network_header, span + (SKB_NETWORK_HEADER - SKB_SPAN_FIRST), 2);
    __builtin_memcpy(head, span + (SKB_HEAD - SKB_SPAN_FIRST), 8);
    return 0;
#else
    if (bpf_probe_read_kernel(iif, 4, skb + SKB_IIF) ||
        bpf_probe_read_kernel(network_header, 2, skb + SKB_NETWORK_HEADER) ||
        bpf_probe_read_kernel(head, 8, skb + SKB_HEAD))
        return -1;
    return 0;
#endif
}

/* A selected pod's own address (a node address's drops have no socket to tell its owner). */
static __always_inline int drop_local_ip(struct drop_key *key)
{
    u8 *local;
    if (key->family == AF_INET_) {
        u32 saddr;
        __builtin_memcpy(&saddr, key->saddr, 4);
        local = local4.lookup(&saddr);
    } else {
        struct ip6_addr a = {};
        __builtin_memcpy(a.addr, key->saddr, 16);
        local = local6.lookup(&a);
    }
    return local && *local == LOCAL_SELECTED;
}

static __always_inline int drop_remote_in_cidrs(struct drop_key *key)
{
    if (key->family == AF_INET_) {
        struct cidr4_key c = {.prefixlen = 32};
        __builtin_memcpy(c.addr, key->daddr, 4);
        return cidrs4.lookup(&c) != 0;
    }
    struct cidr6_key c = {.prefixlen = 128};
    __builtin_memcpy(c.addr, key->daddr, 16);
    return cidrs6.lookup(&c) != 0;
}

/* Make the other end the local one. */
static __always_inline void drop_flip(struct drop_key *key)
{
    u8 tmp[16];
    __builtin_memcpy(tmp, key->saddr, 16);
    __builtin_memcpy(key->saddr, key->daddr, 16);
    __builtin_memcpy(key->daddr, tmp, 16);
    u16 port = key->sport;
    key->sport = key->dport;
    key->dport = port;
    key->direction = key->direction == DROP_INBOUND ? DROP_OUTBOUND : DROP_INBOUND;
}

TRACEPOINT_PROBE(skb, kfree_skb)
{
    const void *skbaddr = args->skbaddr;
    u16 protocol = args->protocol;
    u32 reason = args->reason;
    if (reason == DROP_REASON_NOT_SPECIFIED)
        return 0;
    if (protocol != ETH_P_IP_ && protocol != ETH_P_IPV6_)
        return 0;
    u32 zero = 0;
    struct config *cfg = config.lookup(&zero);
    if (!cfg || !cfg->families)   /* not configured yet */
        return 0;
    u32 iif = 0;
    u16 network_header = 0;
    const char *head = 0;
    if (read_skb(skbaddr, &iif, &network_header, &head) || !head || network_header == 0xffff)
        return 0;   /* 0xffff: no network header set (the skb never reached IP) */
    const char *ip = head + network_header;

    /* Start with the packet's source as the local end (outbound), flipped below. */
    struct drop_key key = {};
    u8 hdr[44];   /* IPv6 header + TCP ports, or IPv4 (20 bytes without options) + ports */
    if (protocol == ETH_P_IP_) {
        if (!(cfg->families & FAMILY_IPV4))
            return 0;
        if (bpf_probe_read_kernel(hdr, 24, ip) || (hdr[0] >> 4) != 4 || hdr[9] != IPPROTO_TCP_)
            return 0;
        u32 ihl = (hdr[0] & 0xf) * 4;
        if (ihl != 20 && bpf_probe_read_kernel(hdr + 20, 4, ip + (ihl & 0x3c)))
            return 0;   /* options: the ports follow them */
        key.family = AF_INET_;
        __builtin_memcpy(key.saddr, hdr + 12, 4);
        __builtin_memcpy(key.daddr, hdr + 16, 4);
        key.sport = ((u16)hdr[20] << 8) | hdr[21];
        key.dport = ((u16)hdr[22] << 8) | hdr[23];
    } else {
        if (!(cfg->families & FAMILY_IPV6))
            return 0;
        /* Only a TCP header right after the fixed header: extension headers are rare on TCP. */
        if (bpf_probe_read_kernel(hdr, 44, ip) || (hdr[0] >> 4) != 6 || hdr[6] != IPPROTO_TCP_)
            return 0;
        key.family = AF_INET6_;
        __builtin_memcpy(key.saddr, hdr + 8, 16);
        __builtin_memcpy(key.daddr, hdr + 24, 16);
        key.sport = ((u16)hdr[40] << 8) | hdr[41];
        key.dport = ((u16)hdr[42] << 8) | hdr[43];
    }
    key.direction = DROP_OUTBOUND;
    if (iif)
        drop_flip(&key);   /* received: the destination is local */

    if (cfg->local_ips_enabled && !drop_local_ip(&key)) {
        drop_flip(&key);
        if (!drop_local_ip(&key))
            return 0;
    }
    if (cfg->ports_enabled) {
        u32 sport = key.sport, dport = key.dport;
        u8 *s = ports.lookup(&sport), *d = ports.lookup(&dport);
        if (!(s && *s) && !(d && *d))
            return 0;
    }
    if (cfg->cidrs_enabled && !drop_remote_in_cidrs(&key))
        return 0;

    key.reason = reason;
    u32 slot = reason < DROP_REASON_SLOTS ? reason : 0;
    u64 *total = drop_totals.lookup(&slot);
    if (total)
        (*total)++;
    u64 *count = drops.lookup(&key);
    if (count) {
        __sync_fetch_and_add(count, 1);
    } else {
        u64 one = 1;
        if (drops.insert(&key, &one))   /* another CPU inserted it first */
            if ((count = drops.lookup(&key)))
                __sync_fetch_and_add(count, 1);
    }
    return 0;
}
#endif /* HAVE_DROP_REASONS */
