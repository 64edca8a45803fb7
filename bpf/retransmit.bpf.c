/* Count TCP retransmits per flow in the kernel, with exact totals and rate-limited samples.
 *
 * Hooks: tracepoints tcp:tcp_retransmit_skb and tcp:tcp_retransmit_synack. Only tracepoint
 * fields are read (bcc builds `args` from the tracefs format file), so the program follows
 * the running kernel's layout and needs no struct sock.
 *
 * Cost per event is kept near a bare counter's: filters are skipped unless enabled, flow
 * keys are small (one map per family), and consecutive retransmits of one flow on a CPU
 * (the common case: they come in bursts) are counted in a per-CPU run without a hash
 * lookup or a clock read (see struct run4 and struct clock in retransmit.h).
 *
 * Compile-time switches (cflags): USE_RINGBUF (else a perf buffer), HAVE_RETRANSMIT_ERR
 * (the tracepoint has Linux 6.17's `err` field: it then also fires for failed attempts,
 * which are set aside so every kernel counts the same thing), FLOW_CAPACITY,
 * RINGBUF_PAGES, FILTER_CAPACITY. Run-time configuration: the maps `config`, `ports`,
 * `cidrs4`, `cidrs6`, `local4`, `local6`, filled by the agent.
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
BPF_PERCPU_ARRAY(runs4, struct run4, 1);
BPF_PERCPU_ARRAY(runs6, struct run6, 1);
BPF_ARRAY(clock, struct clock, 1);
BPF_ARRAY(sample_window, struct sample_window, 1);

#ifdef USE_RINGBUF
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
#endif

/* Add counts to a flow's map entry, creating it if needed. Atomic adds: two CPUs may
 * flush runs of the same flow at once (the socket moved between CPUs). */
static __always_inline void add_to_flow4(struct flow_key4 *key, u64 retransmits,
                                    u64 synacks, u64 first_ns, u64 last_ns,
                                    u32 state)
{
    struct flow_stats *stats = flows4.lookup(key);
    if (!stats) {
        struct flow_stats init = {.retransmits = retransmits,
                                  .synack_retransmits = synacks, .first_ns = first_ns,
                                  .last_ns = last_ns, .last_state = state};
        if (flows4.insert(key, &init) == 0)
            return;
        stats = flows4.lookup(key); /* another CPU inserted it first */
        if (!stats)
            return;
    }
    if (retransmits)
        __sync_fetch_and_add(&stats->retransmits, retransmits);
    if (synacks)
        __sync_fetch_and_add(&stats->synack_retransmits, synacks);
    if (last_ns > stats->last_ns) {
        stats->last_ns = last_ns;
        stats->last_state = state;
    }
}


static __always_inline void add_to_flow6(struct flow_key6 *key, u64 retransmits,
                                    u64 synacks, u64 first_ns, u64 last_ns,
                                    u32 state)
{
    struct flow_stats *stats = flows6.lookup(key);
    if (!stats) {
        struct flow_stats init = {.retransmits = retransmits,
                                  .synack_retransmits = synacks, .first_ns = first_ns,
                                  .last_ns = last_ns, .last_state = state};
        if (flows6.insert(key, &init) == 0)
            return;
        stats = flows6.lookup(key); /* another CPU inserted it first */
        if (!stats)
            return;
    }
    if (retransmits)
        __sync_fetch_and_add(&stats->retransmits, retransmits);
    if (synacks)
        __sync_fetch_and_add(&stats->synack_retransmits, synacks);
    if (last_ns > stats->last_ns) {
        stats->last_ns = last_ns;
        stats->last_state = state;
    }
}


static __always_inline int same_key4(struct flow_key4 *a, struct flow_key4 *b)
{
    return a->saddr == b->saddr && a->daddr == b->daddr && a->sport == b->sport &&
           a->dport == b->dport;
}

static __always_inline int same_key6(struct flow_key6 *a, struct flow_key6 *b)
{
    u64 *x = (u64 *)a->saddr, *y = (u64 *)b->saddr;
    return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3] &&
           a->sport == b->sport && a->dport == b->dport;
}

/* The event's time if it continues this CPU's run of flow `key` (counted), else 0. */
static __always_inline u64 continue_run4(struct run4 *run, struct clock *clk,
                                           struct flow_key4 *key, u32 state, u32 generation)
{
    if (!run->retransmits || run->generation != generation || !same_key4(&run->key, key))
        return 0;
    u64 npj = clk->ns_per_jiffy;
    u64 now = npj ? run->first_ns + (bpf_jiffies64() - run->first_jiffies) * npj
                  : bpf_ktime_get_ns();
    run->retransmits++;
    run->last_ns = now;
    run->last_state = state;
    return now;
}

/* Move this CPU's run into the flow map and start a new one with `key`; returns the time. */
static __always_inline u64 start_run4(struct run4 *run, struct clock *clk,
                                        struct flow_key4 *key, u32 state, u32 generation)
{
    u64 now = bpf_ktime_get_ns();
    u64 jiffies = bpf_jiffies64();
    if (!clk->base_jiffies) {
        clk->base_ns = now;
        clk->base_jiffies = jiffies;
    } else if (jiffies - clk->base_jiffies >= 16) {
        clk->ns_per_jiffy = (now - clk->base_ns) / (jiffies - clk->base_jiffies);
    }
    if (run->retransmits)
        add_to_flow4(&run->key, run->retransmits, 0, run->first_ns, run->last_ns,
                     run->last_state);
    run->key = *key;
    run->generation = generation;
    run->retransmits = 1;
    run->first_ns = now;
    run->first_jiffies = jiffies;
    run->last_ns = now;
    run->last_state = state;
    return now;
}

/* The event's time if it continues this CPU's run of flow `key` (counted), else 0. */
static __always_inline u64 continue_run6(struct run6 *run, struct clock *clk,
                                           struct flow_key6 *key, u32 state, u32 generation)
{
    if (!run->retransmits || run->generation != generation || !same_key6(&run->key, key))
        return 0;
    u64 npj = clk->ns_per_jiffy;
    u64 now = npj ? run->first_ns + (bpf_jiffies64() - run->first_jiffies) * npj
                  : bpf_ktime_get_ns();
    run->retransmits++;
    run->last_ns = now;
    run->last_state = state;
    return now;
}

/* Move this CPU's run into the flow map and start a new one with `key`; returns the time. */
static __always_inline u64 start_run6(struct run6 *run, struct clock *clk,
                                        struct flow_key6 *key, u32 state, u32 generation)
{
    u64 now = bpf_ktime_get_ns();
    u64 jiffies = bpf_jiffies64();
    if (!clk->base_jiffies) {
        clk->base_ns = now;
        clk->base_jiffies = jiffies;
    } else if (jiffies - clk->base_jiffies >= 16) {
        clk->ns_per_jiffy = (now - clk->base_ns) / (jiffies - clk->base_jiffies);
    }
    if (run->retransmits)
        add_to_flow6(&run->key, run->retransmits, 0, run->first_ns, run->last_ns,
                     run->last_state);
    run->key = *key;
    run->generation = generation;
    run->retransmits = 1;
    run->first_ns = now;
    run->first_jiffies = jiffies;
    run->last_ns = now;
    run->last_state = state;
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

static __always_inline void count_totals(struct totals *t, u8 kind, u32 slot)
{
    if (kind == KIND_SYNACK)
        t->synack_retransmits++;
    else
        t->retransmits++;
    t->by_state[slot & (STATE_SLOTS - 1)]++;
}

/* Filter, count and sample one event; `ev` holds the tracepoint's fields (ts_ns unset). */
static __always_inline int handle(void *ctx, struct event *ev)
{
    u32 zero = 0;
    struct config *cfg = config.lookup(&zero);
    struct totals *t = totals.lookup(&zero);
    struct clock *clk = clock.lookup(&zero);
    if (!cfg || !t || !clk)
        return 0;

    /* Cheap filters: a bit test and an array index. */
    int is_v4 = ev->family == AF_INET_;
    if (!(cfg->families & (is_v4 ? FAMILY_IPV4 : FAMILY_IPV6)))
        return 0;
    u32 slot = ev->state;
    if (cfg->states && !(cfg->states & (1U << slot)))
        return 0;
    if (cfg->ports_enabled) {
        u32 sport = ev->sport, dport = ev->dport;
        u8 *s = ports.lookup(&sport), *d = ports.lookup(&dport);
        if (!(s && *s) && !(d && *d))
            return 0;
    }
    int synack = ev->kind == KIND_SYNACK;

    if (is_v4) {
        struct flow_key4 key = {};
        __builtin_memcpy(&key.saddr, ev->saddr, 4);
        __builtin_memcpy(&key.daddr, ev->daddr, 4);
        key.sport = ev->sport;
        key.dport = ev->dport;
        struct run4 *run = runs4.lookup(&zero);
        if (!run)
            return 0;
        /* The flow of this CPU's run passed the address filters under this generation. */
        u64 now = synack ? 0 : continue_run4(run, clk, &key, slot, cfg->generation);
        if (!now) {
            if (cfg->cidrs_enabled) {
                struct cidr4_key c = {.prefixlen = 32};
                __builtin_memcpy(c.addr, ev->daddr, 4);
                if (!cidrs4.lookup(&c))
                    return 0;
            }
            if (cfg->local_ips_enabled && !local4.lookup(&key.saddr))
                return 0;
            if (synack) {   /* rare: straight into the flow map */
                now = bpf_ktime_get_ns();
                add_to_flow4(&key, 0, 1, now, now, slot);
            } else {
                now = start_run4(run, clk, &key, slot, cfg->generation);
            }
        }
        ev->ts_ns = now;
    } else {
        struct flow_key6 key = {};
        __builtin_memcpy(key.saddr, ev->saddr, 16);
        __builtin_memcpy(key.daddr, ev->daddr, 16);
        key.sport = ev->sport;
        key.dport = ev->dport;
        struct run6 *run = runs6.lookup(&zero);
        if (!run)
            return 0;
        u64 now = synack ? 0 : continue_run6(run, clk, &key, slot, cfg->generation);
        if (!now) {
            if (cfg->cidrs_enabled) {
                struct cidr6_key c = {.prefixlen = 128};
                __builtin_memcpy(c.addr, ev->daddr, 16);
                if (!cidrs6.lookup(&c))
                    return 0;
            }
            if (cfg->local_ips_enabled && !local6.lookup((struct ip6_addr *)key.saddr))
                return 0;
            if (synack) {
                now = bpf_ktime_get_ns();
                add_to_flow6(&key, 0, 1, now, now, slot);
            } else {
                now = start_run6(run, clk, &key, slot, cfg->generation);
            }
        }
        ev->ts_ns = now;
    }

    count_totals(t, ev->kind, slot);
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
