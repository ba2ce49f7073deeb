// SPDX-License-Identifier: GPL-2.0-only OR MIT
/*
 * The kernel half of guest-proxy-agent. Read ../shared/spec/ebpf-redirector.md first.
 *
 * connect4 / connect6: a TCP connect to an intercepted endpoint is rewritten to the local proxy
 * and the caller (tgid, tid, uid, gid, cgroup, comm, original destination) is recorded under
 * the socket cookie in `pending`.
 *
 * sockops (TCP_CONNECT_CB): the source port now exists and the SYN is not sent yet; the record
 * moves to `audit`, keyed by (netns cookie, source ip, source port), which is exactly what the
 * proxy can compute from an accepted socket. Keying by cookie alone would not work: the
 * accepted socket has a different cookie from the client's.
 *
 * No kprobes, no CO-RE, no kernel structure reads: these load on hardened kernels.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "maps.h"

/* From <sys/socket.h>, which cannot be included for the bpf target. */
#define SOCK_STREAM 1

/* Capacities; mirrored in agent/src/limits.rs. */
#define POLICY_MAX_ENTRIES 16
#define SKIP_MAX_ENTRIES 16
#define PENDING_MAX_ENTRIES 4096
#define AUDIT_MAX_ENTRIES 16384

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, POLICY_MAX_ENTRIES);
	__type(key, struct gpa_policy_key);
	__type(value, struct gpa_policy_value);
} gpa_policy SEC(".maps");

/* tgids that are never redirected (the agent itself). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SKIP_MAX_ENTRIES);
	__type(key, __u32);
	__type(value, __u32);
} gpa_skip SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct gpa_config);
} gpa_config SEC(".maps");

/* LRU: a connect that never reaches TCP_CONNECT_CB (refused by routing) must not leak. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, PENDING_MAX_ENTRIES);
	__type(key, __u64);
	__type(value, struct gpa_caller);
} gpa_pending SEC(".maps");

/*
 * LRU: an evicted entry makes the proxy answer 421 (no identity), which fails closed. An
 * attacker churning connections can cost a victim a retry, never an identity.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, AUDIT_MAX_ENTRIES);
	__type(key, struct gpa_audit_key);
	__type(value, struct gpa_caller);
} gpa_audit SEC(".maps");

static __always_inline int is_agent(struct bpf_sock_addr *ctx)
{
	__u32 zero = 0;
	struct gpa_config *cfg = bpf_map_lookup_elem(&gpa_config, &zero);
	struct bpf_sock *sk = ctx->sk;

	if (cfg && cfg->agent_mark != 0 && sk && sk->mark == cfg->agent_mark)
		return 1;
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	return bpf_map_lookup_elem(&gpa_skip, &tgid) != 0;
}

/* Looks the destination up, records the caller and returns where to connect instead. */
static __always_inline struct gpa_policy_value *intercept(struct bpf_sock_addr *ctx, __u32 ip,
							  __u16 port, __u32 is_v6)
{
	struct gpa_policy_key key = { .ip = ip, .port = port, ._pad = 0 };
	struct gpa_policy_value *target;
	struct gpa_caller caller = {};
	__u64 pid_tgid, uid_gid, cookie;

	if (ctx->type != SOCK_STREAM)
		return 0;
	target = bpf_map_lookup_elem(&gpa_policy, &key);
	if (!target || is_agent(ctx))
		return 0;

	pid_tgid = bpf_get_current_pid_tgid();
	uid_gid = bpf_get_current_uid_gid();
	caller.cgroup_id = bpf_get_current_cgroup_id();
	caller.netns_cookie = bpf_get_netns_cookie(ctx);
	caller.connect_boot_ns = bpf_ktime_get_boot_ns();
	caller.tgid = pid_tgid >> 32;
	caller.tid = (__u32)pid_tgid;
	caller.uid = (__u32)uid_gid;
	caller.gid = uid_gid >> 32;
	caller.orig_ip = ip;
	caller.orig_port = port;
	caller.endpoint = target->endpoint;
	caller.is_v6 = is_v6;
	bpf_get_current_comm(caller.comm, sizeof(caller.comm));

	cookie = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(&gpa_pending, &cookie, &caller, BPF_ANY) != 0)
		return 0; /* unrecordable: leave it alone; the host rejects it unsigned */
	return target;
}

SEC("cgroup/connect4")
int gpa_connect4(struct bpf_sock_addr *ctx)
{
	struct gpa_policy_value *target =
		intercept(ctx, ctx->user_ip4, (__u16)ctx->user_port, 0);

	if (target) {
		ctx->user_ip4 = target->proxy_ip;
		ctx->user_port = target->proxy_port;
	}
	return 1;
}

SEC("cgroup/connect6")
int gpa_connect6(struct bpf_sock_addr *ctx)
{
	struct gpa_policy_value *target;

	/* Only the v4-mapped form ::ffff:a.b.c.d of an IPv4 endpoint. */
	if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 ||
	    ctx->user_ip6[2] != bpf_htonl(0x0000ffff))
		return 1;
	target = intercept(ctx, ctx->user_ip6[3], (__u16)ctx->user_port, 1);
	if (target) {
		ctx->user_ip6[3] = target->proxy_ip;
		ctx->user_port = target->proxy_port;
	}
	return 1;
}

SEC("sockops")
int gpa_sockops(struct bpf_sock_ops *skops)
{
	struct gpa_audit_key key = {};
	struct gpa_caller *caller;
	__u64 cookie;

	if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
		return 1;
	cookie = bpf_get_socket_cookie(skops);
	caller = bpf_map_lookup_elem(&gpa_pending, &cookie);
	if (!caller)
		return 1;
	key.netns_cookie = caller->netns_cookie;
	key.src_ip = skops->local_ip4;
	key.src_port = (__u16)skops->local_port;
	bpf_map_update_elem(&gpa_audit, &key, caller, BPF_ANY);
	bpf_map_delete_elem(&gpa_pending, &cookie);
	return 1;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
