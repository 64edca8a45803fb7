/* Count TCP retransmits per flow in the kernel, with exact totals and rate-limited samples.
 *
 * Hooks: tracepoints tcp:tcp_retransmit_skb and tcp:tcp_retransmit_synack. Only tracepoint
 * fields are read (bcc builds `args` from the tracefs format file), so the program follows
 * the running kernel's layout and needs no struct sock.
 *
 * Cost per event is kept near a bare counter's: filters are skipped unless enabled, flow
 * keys are small (one map per family), and consecutive retransmits of one flow on a CPU
 * (the common case: they come in bursts) are counted in a per-CPU run without a hash
 * lookup or a clock read (see struct run and struct clock in retransmit.h).
 *
 * Both families take one code path: an event becomes a struct flow_key (IPv4 addresses in
 * its first 4 bytes); only the maps keyed by address (flows, address filters) are per
 * family, and those few lines pick the map by key.family.
 *
 * Only the fields every kernel since 4.15 has are assumed: skaddr, sport, dport, saddr,
 * daddr, saddr_v6, daddr_v6. Compile-time switches (cflags), chosen by the agent from the
 * running kernel's format files and helper probes (agent/kernelinfo.py):
 *   HAVE_SKB_STATE  tcp_retransmit_skb has `state` (Linux 5.0+); else state UNKNOWN (0)
 *   HAVE_SKB_ERR    ... has `err` (6.17+): it then also fires for failed attempts, which
 *                   are set aside so every kernel counts the same thing
 *   HAVE_JIFFIES64  bpf_jiffies64() exists (5.5+): runs estimate time without the clock
 *   USE_RINGBUF     BPF ring buffer (5.8+, RHEL 8.4+), else a perf buffer
 *   HAVE_SOCK_BTF   the node's BTF gave the socket fields' offsets (SOCK_* constants):
 *                   each retransmit gets a cause and the flow the socket's RTT and window
 *   HAVE_PROBE_READ_KERNEL  bpf_probe_read_kernel() (5.5+), else bpf_probe_read()
 * and FLOW_CAPACITY, RINGBUF_PAGES, FILTER_CAPACITY. Run-time configuration: the maps `config`, `ports`,
 * `cidrs4`, `cidrs6`, `local4`, `local6`, filled by the agent.
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

/* Small keys per family: hashing a 12-byte key is much cheaper than a 40-byte one. */
BPF_TABLE("lru_hash", struct flow_key4, struct flow_stats, flows4, FLOW_CAPACITY);
BPF_TABLE("lru_hash", struct flow_key6, struct flow_stats, flows6, FLOW_CAPACITY);

BPF_PERCPU_ARRAY(totals, struct totals, 1);
BPF_PERCPU_ARRAY(runs, struct run, 1);
BPF_ARRAY(clock, struct clock, 1);
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
    if (!stats->first_ns)
        stats->first_ns = add->first_ns;
    if (add->last_ns > stats->last_ns) {
        stats->last_ns = add->last_ns;
        stats->last_state = add->last_state;
        if (add->sock.valid)
            stats->sock = add->sock;
    }
}

/* The flow's entry in its family's map, created empty on first sight (NULL only when the
 * map refuses). `empty` is on the stack: before Linux 4.18 a helper's value argument must be. */
static __always_inline struct flow_stats *flow_entry(struct flow_key *key, struct flow_stats *empty)
{
    if (key->family == AF_INET_) {
        struct flow_key4 k = {.sport = key->sport, .dport = key->dport};
        __builtin_memcpy(&k.saddr, key->saddr, 4);
        __builtin_memcpy(&k.daddr, key->daddr, 4);
        return flows4.lookup_or_try_init(&k, empty);
    }
    struct flow_key6 k = {.sport = key->sport, .dport = key->dport};
    __builtin_memcpy(k.saddr, key->saddr, 16);
    __builtin_memcpy(k.daddr, key->daddr, 16);
    return flows6.lookup_or_try_init(&k, empty);
}

static __always_inline void add_to_flow(struct flow_key *key, struct flow_stats *add)
{
    struct flow_stats empty = {};
    struct flow_stats *stats = flow_entry(key, &empty);
    if (stats)
        merge_stats(stats, add);
}

/* The address filters (remote CIDRs, local addresses): lookups in the family's maps. */
static __always_inline int addresses_pass(struct config *cfg, struct flow_key *key)
{
    if (key->family == AF_INET_) {
        if (cfg->cidrs_enabled) {
            struct cidr4_key c = {.prefixlen = 32};
            __builtin_memcpy(c.addr, key->daddr, 4);
            if (!cidrs4.lookup(&c))
                return 0;
        }
        u32 saddr;
        __builtin_memcpy(&saddr, key->saddr, 4);
        if (cfg->local_ips_enabled && !local4.lookup(&saddr))
            return 0;
    } else {
        if (cfg->cidrs_enabled) {
            struct cidr6_key c = {.prefixlen = 128};
            __builtin_memcpy(c.addr, key->daddr, 16);
            if (!cidrs6.lookup(&c))
                return 0;
        }
        if (cfg->local_ips_enabled && !local6.lookup((struct ip6_addr *)key->saddr))
            return 0;
    }
    return 1;
}

static __always_inline int same_flow(struct flow_key *a, struct flow_key *b)
{
    u64 *x = (u64 *)a, *y = (u64 *)b;
    return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3] && x[4] == y[4];
}

/* ---- the clock ------------------------------------------------------------------------- */

#ifdef HAVE_JIFFIES64
/* Read the clock for a run's first event and refine the jiffies -> ns calibration. */
static __always_inline u64 start_clock(struct clock *clk, u64 *jiffies)
{
    u64 now = bpf_ktime_get_ns();
    *jiffies = bpf_jiffies64();
    if (!clk->base_jiffies) {
        clk->base_ns = now;
        clk->base_jiffies = *jiffies;
    } else if (*jiffies - clk->base_jiffies >= 16) {
        clk->ns_per_jiffy = (now - clk->base_ns) / (*jiffies - clk->base_jiffies);
    }
    return now;
}

/* A later event of a run: its time estimated from jiffies (a load, not a clock read). */
static __always_inline u64 run_clock(struct clock *clk, u64 first_ns, u64 first_jiffies)
{
    u64 npj = clk->ns_per_jiffy;
    return npj ? first_ns + (bpf_jiffies64() - first_jiffies) * npj : bpf_ktime_get_ns();
}
#else
/* No bpf_jiffies64() (before Linux 5.5): every event reads the clock. */
static __always_inline u64 start_clock(struct clock *clk, u64 *jiffies)
{
    *jiffies = 0;
    return bpf_ktime_get_ns();
}

static __always_inline u64 run_clock(struct clock *clk, u64 first_ns, u64 first_jiffies)
{
    return bpf_ktime_get_ns();
}
#endif

/* ---- per-CPU runs ----------------------------------------------------------------------- */

/* The event's time if it continues this CPU's run of flow `key` (counted), else 0. */
static __always_inline u64 continue_run(struct run *run, struct clock *clk, struct flow_key *key,
                                        u32 state, u32 generation, u8 cause, struct sock_info *sock)
{
    if (!run->retransmits || run->generation != generation || !same_flow(&run->key, key))
        return 0;
    u64 now = run_clock(clk, run->first_ns, run->first_jiffies);
    run->retransmits++;
    run->by_cause[cause & (CAUSE_SLOTS - 1)]++;
    run->last_ns = now;
    run->last_state = state;
    /* the run's socket statistics stay those read at its start (see read_sock_stats) */
    run->sock.ca_state = sock->ca_state;
    run->sock.timeouts = sock->timeouts;
    return now;
}

/* Move this CPU's run into the flow map and start a new one with `key`; returns the time. */
static __always_inline u64 start_run(struct run *run, struct clock *clk, struct flow_key *key,
                                     u32 state, u32 generation, u8 cause, struct sock_info *sock)
{
    u64 jiffies;
    u64 now = start_clock(clk, &jiffies);
    if (run->retransmits) {
        struct flow_key done = run->key;
        struct flow_stats add = {.retransmits = run->retransmits, .first_ns = run->first_ns,
                                 .last_ns = run->last_ns, .last_state = run->last_state,
                                 .sock = run->sock};
        __builtin_memcpy(add.by_cause, run->by_cause, sizeof(add.by_cause));
        add_to_flow(&done, &add);
    }
    run->key = *key;
    run->generation = generation;
    run->retransmits = 1;
    __builtin_memset(run->by_cause, 0, sizeof(run->by_cause));
    run->by_cause[cause & (CAUSE_SLOTS - 1)] = 1;
    run->first_ns = now;
    run->first_jiffies = jiffies;
    run->last_ns = now;
    run->last_state = state;
    run->sock = *sock;
    return now;
}

/* Hand one sample to user space unless the per-second budget is spent. */
static __always_inline void sample(void *ctx, struct config *cfg, struct totals *t,
                                   struct event *ev)
{
    u32 zero = 0;
    struct sample_window *w = sample_window.lookup(&zero);
    if (!w)
        return;
    /* Signed: event times estimated from jiffies may trail another CPU's clock read. */
    if ((s64)(ev->ts_ns - w->start_ns) >= 1000000000LL) {
        /* Racy between CPUs by design: the budget may be exceeded by a few samples. */
        w->start_ns = ev->ts_ns;
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
    __builtin_memcpy(e, ev, sizeof(*e));
    /* No wake-up per event: the agent drains the buffer on a timer. */
    events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
    t->sampled++;
#else
    if (events.perf_submit(ctx, ev, sizeof(*ev)) < 0)
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

/* At the first retransmit of a run (a burst of one flow on one CPU): RTT, window and
 * segments in flight. Read once per run, not per event, to keep the cost per event low. */
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
}
#endif

/* Filter, count and sample one event; `ev` holds the tracepoint's fields (ts_ns unset). */
static __always_inline int handle(void *ctx, struct event *ev, const void *sk, struct sock_info *sock)
{
    u32 zero = 0;
    struct config *cfg = config.lookup(&zero);
    struct totals *t = totals.lookup(&zero);
    struct clock *clk = clock.lookup(&zero);
    struct run *run = runs.lookup(&zero);
    if (!cfg || !t || !clk || !run)
        return 0;
    u32 slot = ev->state;
    int synack = ev->kind == KIND_SYNACK;
    u8 cause = cause_of(sock, slot);
    struct flow_key key = {.sport = ev->sport, .dport = ev->dport, .family = ev->family};
    __builtin_memcpy(key.saddr, ev->saddr, 16);
    __builtin_memcpy(key.daddr, ev->daddr, 16);

#ifndef WITHOUT_FILTERS
    /* Cheap filters: a bit test and an array index. */
    if (!(cfg->families & (ev->family == AF_INET_ ? FAMILY_IPV4 : FAMILY_IPV6)))
        return 0;
    if (cfg->states && !(cfg->states & (1U << slot)))
        return 0;
    if (cfg->ports_enabled) {
        u32 sport = ev->sport, dport = ev->dport;
        u8 *s = ports.lookup(&sport), *d = ports.lookup(&dport);
        if (!(s && *s) && !(d && *d))
            return 0;
    }
#endif

    u64 now = 0;
#ifndef WITHOUT_FLOWS
    /* The flow of this CPU's run passed the address filters under this generation. */
    now = synack ? 0 : continue_run(run, clk, &key, slot, cfg->generation, cause, sock);
    if (!now) {
#ifndef WITHOUT_FILTERS
        if (!addresses_pass(cfg, &key))
            return 0;
#endif
        if (synack) {   /* rare: straight into the flow map */
            now = bpf_ktime_get_ns();
            struct flow_stats add = {.synack_retransmits = 1, .first_ns = now,
                                     .last_ns = now, .last_state = slot};
            add.by_cause[CAUSE_UNKNOWN] = 1;
            add_to_flow(&key, &add);
        } else {
#if defined(HAVE_SOCK_BTF) && !defined(WITHOUT_SOCK_STATS)
            if (sock->valid)
                read_sock_stats(sk, sock);
#endif
            now = start_run(run, clk, &key, slot, cfg->generation, cause, sock);
        }
    }
#endif
    ev->ts_ns = now;

    count_totals(t, ev->kind, slot, cause);
#ifndef WITHOUT_SAMPLES
    if (cfg->max_per_second)
        sample(ctx, cfg, t, ev);
#endif
    return 0;
}

/* An IPv4 connection has a v4-mapped daddr_v6 (::ffff:a.b.c.d) on every kernel: the
 * tracepoints store an AF_INET socket's addresses that way, and an AF_INET6 socket talking
 * IPv4 (a dual-stack server on [::]) has them so. The `family` field (5.12+) says the
 * socket's family, which for the latter is AF_INET6: the wire's family comes from here.
 * IPv4 addresses then move to the first 4 bytes, as struct event expects. */
static __always_inline void classify_family(struct event *ev)
{
    u32 *s = (u32 *)ev->saddr, *d = (u32 *)ev->daddr;
    if (d[0] == 0 && d[1] == 0 && ev->daddr[8] == 0 && ev->daddr[9] == 0 &&
        ev->daddr[10] == 0xff && ev->daddr[11] == 0xff) {
        ev->family = AF_INET_;
        s[0] = s[3];
        d[0] = d[3];
        s[1] = s[2] = s[3] = 0;
        d[1] = d[2] = d[3] = 0;
    } else {
        ev->family = AF_INET6_;
    }
}

/* Copy the fields every kernel since 4.15 has (constant-offset context reads only). */
#define COPY_FIELDS(ev, args)                                          \
    do {                                                               \
        (ev).sport = (args)->sport;                                    \
        (ev).dport = (args)->dport;                                    \
        __builtin_memcpy((ev).saddr, (args)->saddr_v6, 16);            \
        __builtin_memcpy((ev).daddr, (args)->daddr_v6, 16);            \
        classify_family(&(ev));                                        \
    } while (0)

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
#ifdef HAVE_SKB_ERR
    if (args->err) {
        u32 zero = 0;
        struct totals *t = totals.lookup(&zero);
        if (t)
            t->failed++;
        return 0;
    }
#endif
    struct event ev = {.kind = KIND_RETRANSMIT};
#ifdef HAVE_SKB_STATE
    int state = args->state;
    ev.state = (state > 0 && state < STATE_SLOTS) ? state : 0;
#endif
    /* else state 0: filed under UNKNOWN (the agent refuses a states filter there) */
    COPY_FIELDS(ev, args);
    struct sock_info sock = {};
#ifdef HAVE_SOCK_BTF
    read_sock_state(args->skaddr, &sock);
#endif
    return handle(args, &ev, args->skaddr, &sock);
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_synack)
{
    struct event ev = {.kind = KIND_SYNACK, .state = TCP_SYN_RECV_};
    COPY_FIELDS(ev, args);
    struct sock_info sock = {};   /* a request socket: cause unknown */
    return handle(args, &ev, args->req, &sock);
}
