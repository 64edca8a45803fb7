/* Count TCP retransmits per flow in the kernel, with exact totals and rate-limited samples.
 *
 * Hooks: tracepoints tcp:tcp_retransmit_skb and tcp:tcp_retransmit_synack. Only tracepoint
 * fields are read (bcc builds `args` from the tracefs format file), so the program follows
 * the running kernel's layout and needs no struct sock.
 *
 * Compile-time switches (cflags): USE_RINGBUF (else a perf buffer), HAVE_KTIME_COARSE
 * (bpf_ktime_get_coarse_ns, Linux 5.11+: timestamps at tick resolution for a fraction of
 * bpf_ktime_get_ns's cost, which is a third of this program's), HAVE_RETRANSMIT_ERR
 * (the tracepoint has Linux 6.17's `err` field: it then also fires for failed attempts,
 * which are set aside so every kernel counts the same thing), FLOW_CAPACITY,
 * RINGBUF_PAGES, FILTER_CAPACITY. Run-time configuration: the maps `config`, `ports`,
 * `cidrs4`, `cidrs6`, `local4`, `local6`, filled by the agent.
 */
#include "retransmit.h"

BPF_ARRAY(config, struct config, 1);
BPF_HASH(ports, u16, u8, FILTER_CAPACITY);
BPF_LPM_TRIE(cidrs4, struct cidr4_key, u8, FILTER_CAPACITY);
BPF_LPM_TRIE(cidrs6, struct cidr6_key, u8, FILTER_CAPACITY);
BPF_HASH(local4, u32, u8, FILTER_CAPACITY);
BPF_HASH(local6, struct ip6_addr, u8, FILTER_CAPACITY);

/* Small keys per family: hashing a 12-byte key is much cheaper than a 40-byte one. */
BPF_TABLE("lru_hash", struct flow_key4, struct flow_stats, flows4, FLOW_CAPACITY);
BPF_TABLE("lru_hash", struct flow_key6, struct flow_stats, flows6, FLOW_CAPACITY);

BPF_PERCPU_ARRAY(totals, struct totals, 1);
BPF_ARRAY(sample_window, struct sample_window, 1);

#ifdef HAVE_KTIME_COARSE
#define NOW_NS() bpf_ktime_get_coarse_ns()   /* CLOCK_MONOTONIC_COARSE */
#else
#define NOW_NS() bpf_ktime_get_ns()          /* CLOCK_MONOTONIC */
#endif

#ifdef USE_RINGBUF
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
#endif

/* A plain increment is exact for retransmits: the kernel retransmits for one socket (one
 * flow key) only under that socket's lock, so two CPUs never update the same flow at once. */
static __always_inline void add_flow(struct flow_stats *stats, u8 kind, u64 now, u32 state)
{
    if (kind == KIND_SYNACK)  /* timer and a duplicate SYN may race on a request socket */
        __sync_fetch_and_add(&stats->synack_retransmits, 1);
    else
        stats->retransmits++;
    stats->last_ns = now;
    stats->last_state = state;
}

/* Hand one sample to user space unless the per-second budget is spent. */
static __always_inline void sample(void *ctx, struct config *cfg, struct totals *t,
                                   struct event *ev)
{
    u32 zero = 0;
    struct sample_window *w = sample_window.lookup(&zero);
    if (!w)
        return;
    if (ev->ts_ns - w->start_ns >= 1000000000ULL) {
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

/* Filter, count and sample one event; `ev` holds the tracepoint's fields (ts_ns unset). */
static __always_inline int handle(void *ctx, struct event *ev)
{
    u32 zero = 0;
    struct config *cfg = config.lookup(&zero);
    if (!cfg)
        return 0;

    int is_v4 = ev->family == AF_INET_;
    if (!(cfg->families & (is_v4 ? FAMILY_IPV4 : FAMILY_IPV6)))
        return 0;
    u32 slot = ev->state;
    if (cfg->states && !(cfg->states & (1U << slot)))
        return 0;
    if (cfg->ports_enabled && !ports.lookup(&ev->sport) && !ports.lookup(&ev->dport))
        return 0;

    struct flow_key4 key4 = {};
    struct flow_key6 key6 = {};
    if (is_v4) {
        __builtin_memcpy(&key4.saddr, ev->saddr, 4);
        __builtin_memcpy(&key4.daddr, ev->daddr, 4);
        key4.sport = ev->sport;
        key4.dport = ev->dport;
        if (cfg->cidrs_enabled) {
            struct cidr4_key c = {.prefixlen = 32};
            __builtin_memcpy(c.addr, ev->daddr, 4);
            if (!cidrs4.lookup(&c))
                return 0;
        }
        if (cfg->local_ips_enabled && !local4.lookup(&key4.saddr))
            return 0;
    } else {
        __builtin_memcpy(key6.saddr, ev->saddr, 16);
        __builtin_memcpy(key6.daddr, ev->daddr, 16);
        key6.sport = ev->sport;
        key6.dport = ev->dport;
        if (cfg->cidrs_enabled) {
            struct cidr6_key c = {.prefixlen = 128};
            __builtin_memcpy(c.addr, ev->daddr, 16);
            if (!cidrs6.lookup(&c))
                return 0;
        }
        if (cfg->local_ips_enabled && !local6.lookup((struct ip6_addr *)key6.saddr))
            return 0;
    }

    struct totals *t = totals.lookup(&zero);
    if (!t)
        return 0;
    if (ev->kind == KIND_SYNACK)
        t->synack_retransmits++;
    else
        t->retransmits++;
    t->by_state[slot & (STATE_SLOTS - 1)]++;

    u64 now = NOW_NS();
    ev->ts_ns = now;
    struct flow_stats *stats;
    if (is_v4)
        stats = flows4.lookup(&key4);
    else
        stats = flows6.lookup(&key6);
    if (stats) {
        add_flow(stats, ev->kind, now, slot);
    } else {
        struct flow_stats init = {.first_ns = now, .last_ns = now, .last_state = slot};
        if (ev->kind == KIND_SYNACK)
            init.synack_retransmits = 1;
        else
            init.retransmits = 1;
        int err = is_v4 ? flows4.insert(&key4, &init) : flows6.insert(&key6, &init);
        if (err) {
            /* Another CPU inserted the flow first: count on its entry. */
            stats = is_v4 ? flows4.lookup(&key4) : flows6.lookup(&key6);
            if (stats)
                add_flow(stats, ev->kind, now, slot);
        }
    }

    if (cfg->max_per_second)
        sample(ctx, cfg, t, ev);
    return 0;
}

/* Copy the tracepoint's fields into `ev` (constant-offset context reads only). */
#define COPY_FIELDS(ev, args)                                          \
    do {                                                               \
        (ev).family = (args)->family;                                  \
        (ev).sport = (args)->sport;                                    \
        (ev).dport = (args)->dport;                                    \
        if ((ev).family == AF_INET_) {                                 \
            __builtin_memcpy((ev).saddr, (args)->saddr, 4);            \
            __builtin_memcpy((ev).daddr, (args)->daddr, 4);            \
        } else if ((ev).family == AF_INET6_) {                         \
            __builtin_memcpy((ev).saddr, (args)->saddr_v6, 16);        \
            __builtin_memcpy((ev).daddr, (args)->daddr_v6, 16);        \
        } else {                                                       \
            return 0;                                                  \
        }                                                              \
    } while (0)

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
#ifdef HAVE_RETRANSMIT_ERR
    if (args->err) {
        u32 zero = 0;
        struct totals *t = totals.lookup(&zero);
        if (t)
            t->failed++;
        return 0;
    }
#endif
    struct event ev = {.kind = KIND_RETRANSMIT};
    int state = args->state;
    ev.state = (state > 0 && state < STATE_SLOTS) ? state : 0;
    COPY_FIELDS(ev, args);
    return handle(args, &ev);
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_synack)
{
    struct event ev = {.kind = KIND_SYNACK, .state = TCP_SYN_RECV_};
    COPY_FIELDS(ev, args);
    return handle(args, &ev);
}
