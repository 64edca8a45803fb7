/* Layout of the drop maps of retransmit.bpf.c (its HAVE_DROP_REASONS part): TCP packets of the traced flows that the kernel dropped
 * (skb:kfree_skb with a `reason`, Linux 5.17+). Python reads them through bcc's map types.
 * Addresses are network byte order bytes, ports host byte order, as in retransmit.h. */
#ifndef DROPS_H
#define DROPS_H

/* From the agent's compile flags (agent/drops.py drop_defines), like retransmit.h's:
 *   DROP_FLOW_CAPACITY   entries in the LRU map `drops`
 *   DROP_REASON_SLOTS    entries of `drop_totals`, a power of two above the kernel's
 *                        SKB_DROP_REASON_MAX (read from BTF); slot 0 (SKB_NOT_DROPPED_YET,
 *                        never a drop) collects reasons beyond it (subsystem reasons)
 *   DROP_REASON_NOT_SPECIFIED     that reason's value in this kernel (never counted)
 *   DROP_INBOUND, DROP_OUTBOUND   struct drop_key.direction
 *   ETH_P_IP_, ETH_P_IPV6_        the tracepoint's `protocol` (host byte order)
 *   SKB_IIF, SKB_NETWORK_HEADER, SKB_HEAD   struct sk_buff offsets from the node's BTF */
#if !defined(DROP_FLOW_CAPACITY) || !defined(DROP_REASON_SLOTS) || !defined(DROP_OUTBOUND) || !defined(DROP_REASON_NOT_SPECIFIED) || \
    !defined(ETH_P_IPV6_) || !defined(SKB_HEAD) || !defined(SKB_NETWORK_HEADER) || !defined(SKB_IIF)
#error "drop constants come from the agent's compile flags (agent/drops.py)"
#endif

/* One flow's drops for one reason, seen from the traced (local) side: inbound drops have the
 * packet's destination as saddr, outbound ones its source. IPv4 in the first 4 bytes. */
struct drop_key {
    u8 saddr[16];          /* local side */
    u8 daddr[16];          /* remote side */
    u16 sport;             /* local port */
    u16 dport;             /* remote port */
    u16 family;            /* AF_INET_ or AF_INET6_ */
    u8 direction;          /* DROP_INBOUND or DROP_OUTBOUND */
    u8 pad;
    u32 reason;            /* enum skb_drop_reason */
};

#endif /* DROPS_H */
