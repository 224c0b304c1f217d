// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
/* shoal's XDP screen: the stateless first stage of the data plane.
 *
 * For a packet to a cluster VIP that a "multiple" port rule covers, it computes the rule's
 * bucket with the same jhash as nftables' `jhash ... mod N seed S` and drops, before the
 * kernel allocates anything:
 *   - any packet whose bucket this host never owned (no connection of its can live there);
 *   - a pure TCP SYN whose bucket this host does not own now, for rules that check it;
 *   - a packet to a VIP whose transport header is not where it must be (truncated, or
 *     behind more IPv6 extension headers than a client sends), which nothing could check.
 * Everything else passes to the kernel, where the nftables table shoal installs keeps the
 * connection-aware part (conntrack, new UDP flows, the lease, single rules, the default host,
 * rule states, affinity).
 *
 * The control plane meets this program only in the maps below. Ownership is buffered:
 * the daemon writes a slot no packet reads, then flips `cfg.slot` with one element update,
 * so a packet sees the state before or after a change, never a mix.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define MAX_RULES 32
#define MAX_VIPS 64
#define WORDS 1024 /* 65,536 buckets, one bit each */

/* struct rule.flags */
#define R_TCP 1        /* carries TCP */
#define R_UDP 2        /* carries UDP */
#define R_CHECK_SYN 4  /* a pure SYN must be in an owned bucket */
#define R_ANY_VIP 8    /* every VIP, not only `vip` */
/* struct rule.key */
#define K_PORT 0    /* source address and port */
#define K_ADDR 1    /* source address */
#define K_PREFIX 2  /* source address under the rule's masks */

struct rule {
	__u32 vip;      /* the index of its VIP in `vips` (unless R_ANY_VIP) */
	__u16 first;    /* destination ports, host order */
	__u16 last;
	__u8 flags;
	__u8 key;
	__u8 multiple;  /* 0: the rule's packets pass (single, disabled: nftables decides) */
	__u8 pad;
	__u32 mask4;    /* network order, as the address is read */
	__u32 mask6[4];
};

struct config {
	__u32 slot;     /* which slot of `shoal_bits` packets read */
	__u32 nrules;   /* in match order: one-VIP rules before every-VIP rules */
	__u32 seed;
	__u32 buckets;
	__u32 cluster;  /* whose program this is: a hash of the cluster's name */
	struct rule rules[MAX_RULES];
};

struct vip_key {
	__u32 family;   /* 4 or 6 */
	__u32 addr[4];  /* an IPv4 address in addr[0] */
};

/* one bitmap per (slot, rule, kind): kind 0 owned now, kind 1 ever owned. Three slots: a
 * change that releases and acquires flips twice, and a slot is written again only once no
 * packet can still be reading it */
struct bitmap {
	__u64 w[WORDS];
};

/* per rule and verdict, per CPU */
#define V_PASS 0
#define V_NEVER 1   /* dropped: never owned */
#define V_SYN 2     /* dropped: a SYN not owned */
#define V_MALFORMED 3  /* dropped, to a VIP: no transport header where one must be */
#define VERDICTS 4
#define SLOTS 3
struct tally {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} shoal_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_VIPS);
	__type(key, struct vip_key);
	__type(value, __u32);
} shoal_vips SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SLOTS * MAX_RULES * 2);
	__type(key, __u32);
	__type(value, struct bitmap);
} shoal_bits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, (MAX_RULES + 1) * VERDICTS);  /* the last: no rule known */
	__type(key, __u32);
	__type(value, struct tally);
} shoal_tally SEC(".maps");

static __always_inline __u32 rol32(__u32 w, int s)
{
	return (w << s) | (w >> (32 - s));
}

#define MIX(a, b, c) {                              \
	a -= c; a ^= rol32(c, 4);  c += b;          \
	b -= a; b ^= rol32(a, 6);  a += c;          \
	c -= b; c ^= rol32(b, 8);  b += a;          \
	a -= c; a ^= rol32(c, 16); c += b;          \
	b -= a; b ^= rol32(a, 19); a += c;          \
	c -= b; c ^= rol32(b, 4);  b += a; }

#define FINAL(a, b, c) {                            \
	c ^= b; c -= rol32(b, 14);                  \
	a ^= c; a -= rol32(c, 11);                  \
	b ^= a; b -= rol32(a, 25);                  \
	c ^= b; c -= rol32(b, 16);                  \
	a ^= c; a -= rol32(c, 4);                   \
	b ^= a; b -= rol32(a, 14);                  \
	c ^= b; c -= rol32(b, 24); }

/* the kernel's jhash() of `n` 32-bit words (1, 2, 4 or 5 here), as read from memory */
static __always_inline __u32 jhash_words(const __u32 *k, __u32 n, __u32 seed)
{
	__u32 a, b, c;

	a = b = c = 0xdeadbeef + (n << 2) + seed;
	if (n > 3) {
		a += k[0]; b += k[1]; c += k[2];
		MIX(a, b, c);
		k += 3;
		n -= 3;
	}
	if (n == 3) {
		c += k[2]; b += k[1]; a += k[0];
	} else if (n == 2) {
		b += k[1]; a += k[0];
	} else {
		a += k[0];
	}
	FINAL(a, b, c);
	return c;
}

static __always_inline int count(__u32 rule, __u32 verdict, __u64 len, int action)
{
	__u32 idx = rule * VERDICTS + verdict;
	struct tally *t = bpf_map_lookup_elem(&shoal_tally, &idx);

	if (t) {
		t->packets += 1;
		t->bytes += len;
	}
	return action;
}

/* walks IPv6 extension headers up to this many (a client sends one or two at most) */
#define EXT_MAX 6

SEC("xdp")
int shoal_screen(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u64 len = end - data;
	struct ethhdr *eth = data;
	struct vip_key vk = {};
	__u32 words[5] = {};
	__u32 zero = 0, nwords, i;
	__u8 proto, syn = 0;
	__u16 sport, dport;
	__u32 *vip;  /* the VIP's index */
	void *l4;

	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end)
			return XDP_PASS;
		vk.family = 4;
		vk.addr[0] = ip->daddr;
		vip = bpf_map_lookup_elem(&shoal_vips, &vk);
		if (!vip)
			return XDP_PASS;
		if (ip->frag_off & bpf_htons(0x1fff))
			return XDP_PASS;  /* no transport header: the kernel reassembles it */
		if (ip->ihl < 5)
			return count(MAX_RULES, V_MALFORMED, len, XDP_DROP);
		words[0] = ip->saddr;
		proto = ip->protocol;
		l4 = (void *)ip + ip->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return XDP_PASS;
		vk.family = 6;
		__builtin_memcpy(vk.addr, &ip6->daddr, 16);
		vip = bpf_map_lookup_elem(&shoal_vips, &vk);
		if (!vip)
			return XDP_PASS;
		__builtin_memcpy(words, &ip6->saddr, 16);
		proto = ip6->nexthdr;
		l4 = ip6 + 1;
#pragma unroll
		for (i = 0; i < EXT_MAX; i++) {
			if (proto == IPPROTO_HOPOPTS || proto == IPPROTO_ROUTING ||
			    proto == IPPROTO_DSTOPTS || proto == IPPROTO_AH) {
				__u8 *h = l4;

				if ((void *)(h + 2) > end)
					return count(MAX_RULES, V_MALFORMED, len, XDP_DROP);
				proto = h[0];
				l4 += proto == IPPROTO_AH ? (h[1] + 2) * 4 : (h[1] + 1) * 8;
			} else if (proto == IPPROTO_FRAGMENT) {
				__u8 *h = l4;

				if ((void *)(h + 8) > end)
					return count(MAX_RULES, V_MALFORMED, len, XDP_DROP);
				if ((h[2] << 8 | h[3]) & 0xfff8)
					return XDP_PASS;  /* not the first fragment */
				proto = h[0];
				l4 += 8;
			} else {
				break;
			}
		}
	} else {
		return XDP_PASS;
	}
	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > end)
			return count(MAX_RULES, V_MALFORMED, len, XDP_DROP);
		sport = th->source;
		dport = bpf_ntohs(th->dest);
		syn = th->syn && !th->ack && !th->fin && !th->rst;
	} else if (proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > end)
			return count(MAX_RULES, V_MALFORMED, len, XDP_DROP);
		sport = uh->source;
		dport = bpf_ntohs(uh->dest);
	} else if (vk.family == 6 && (proto == IPPROTO_HOPOPTS || proto == IPPROTO_ROUTING ||
				    proto == IPPROTO_DSTOPTS || proto == IPPROTO_AH ||
				    proto == IPPROTO_FRAGMENT)) {
		/* more extension headers than a client sends: no rule can be checked */
		return count(MAX_RULES, V_MALFORMED, len, XDP_DROP);
	} else {
		return XDP_PASS;  /* ICMP and the rest: no port rule covers them */
	}

	struct config *cfg = bpf_map_lookup_elem(&shoal_cfg, &zero);

	if (!cfg)
		return XDP_PASS;
	__u8 want = proto == IPPROTO_TCP ? R_TCP : R_UDP;
	__u32 n = cfg->nrules;

	for (i = 0; i < MAX_RULES; i++) {
		if (i >= n)
			return XDP_PASS;  /* no rule: the default host's, decided by nftables */
		struct rule *r = &cfg->rules[i];

		if (!(r->flags & want) || dport < r->first || dport > r->last)
			continue;
		if (!(r->flags & R_ANY_VIP) && r->vip != *vip)
			continue;
		if (!r->multiple)
			return count(i, V_PASS, len, XDP_PASS);
		/* the key: the address (1 or 4 words), masked for network affinity, then the
		 * source port (a word, zero-padded as nftables does) for affinity none */
		nwords = vk.family == 4 ? 1 : 4;
		if (r->key == K_PREFIX) {
			if (nwords == 1) {
				words[0] &= r->mask4;
			} else {
				words[0] &= r->mask6[0];
				words[1] &= r->mask6[1];
				words[2] &= r->mask6[2];
				words[3] &= r->mask6[3];
			}
		} else if (r->key == K_PORT) {
			if (nwords == 1)
				words[1] = sport;
			else
				words[4] = sport;
			nwords += 1;
		}
		__u32 h = jhash_words(words, nwords, cfg->seed);
		__u32 bucket = (__u32)(((__u64)h * cfg->buckets) >> 32);
		__u32 base = cfg->slot * MAX_RULES * 2 + i * 2;
		__u64 bit = 1ULL << (bucket & 63);
		__u32 word = (bucket >> 6) & (WORDS - 1);
		__u32 kept = base + 1;
		struct bitmap *ever = bpf_map_lookup_elem(&shoal_bits, &kept);

		if (!ever || !(ever->w[word] & bit))
			return count(i, V_NEVER, len, XDP_DROP);
		if (syn && (r->flags & R_CHECK_SYN)) {
			struct bitmap *owned = bpf_map_lookup_elem(&shoal_bits, &base);

			if (!owned || !(owned->w[word] & bit))
				return count(i, V_SYN, len, XDP_DROP);
		}
		return count(i, V_PASS, len, XDP_PASS);
	}
	return XDP_PASS;
}

/* what the kernel reads: this file is offered under GPL-2.0 as well as Apache-2.0 */
char _license[] SEC("license") = "GPL";
