// SPDX-License-Identifier: GPL-2.0-only OR MIT
/*
 * The kernel half of guest-proxy-agent. Read ../shared/spec/ebpf-redirector.md first.
 *
 * connect4 / connect6: a TCP connect to an intercepted endpoint is refused unless the agent's
 * own listening socket is alive (gpa_listeners: the kernel drops the entry when that socket
 * closes), and otherwise rewritten to exactly that socket's address. Nobody else can receive a
 * redirected caller: not a process that squats the proxy port while the agent is down, not one
 * listening anywhere else. The caller is recorded under the socket cookie in `pending`: ids,
 * cgroup, and, read from the task itself with CO-RE, the executable's device and inode, the
 * process start time, the effective ids and whether it is traced. None of it can be changed
 * by the caller after the connect.
 *
 * sockops (TCP_CONNECT_CB): the source port now exists; the record moves to `audit`, keyed by
 * (netns cookie, source ip, source port), which is exactly what the proxy can compute from an
 * accepted socket. The socket is then watched (STATE_CB): when it closes before the agent took
 * the record, the record goes with it, so a later connection from the same port (a direct one
 * included) never finds it.
 *
 * Built twice: with GPA_TASK_BTF (the default object, needs kernel BTF) and without it (the
 * fallback for kernels without BTF or bpf_get_current_task_btf; the agent then uses /proc).
 * No kprobes.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#ifdef GPA_TASK_BTF
#include <bpf/bpf_core_read.h>
#endif

#include "maps.h"
#ifdef GPA_TASK_BTF
#include "task.h"
#endif

/* From <sys/socket.h>, which cannot be included for the bpf target. */
#define SOCK_STREAM 1
#define AF_INET 2
#define TCP_LISTEN 10

/* Capacities; mirrored in agent/src/limits.rs. */
#define POLICY_MAX_ENTRIES 16
#define SKIP_MAX_ENTRIES 16
#define PENDING_MAX_ENTRIES 4096
#define AUDIT_MAX_ENTRIES 16384
#define LISTENERS_MAX_ENTRIES 64

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

/*
 * The agent's own listening sockets, keyed by network namespace cookie. The agent inserts its
 * listener; the kernel removes the entry by itself when that socket is closed (the agent died,
 * or stopped), which is what makes "no agent, no redirect target" hold without any userspace
 * help at the moment of the connect.
 */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, LISTENERS_MAX_ENTRIES);
	__type(key, __u64);
	__type(value, __u32); /* a socket fd from userspace; lookups in the kernel yield the socket */
} gpa_listeners SEC(".maps");

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

#ifdef GPA_TASK_BTF
/* What the task itself says, read at the moment of the connect. */
static __always_inline void read_task(struct gpa_caller *caller)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct inode *inode;

	caller->flags |= GPA_CALLER_TASK_READ;
	if (BPF_CORE_READ(task, ptrace) != 0)
		caller->flags |= GPA_CALLER_TRACED;
	caller->start_boot_ns = BPF_CORE_READ(task, group_leader, start_boottime);
	caller->euid = BPF_CORE_READ(task, cred, euid.val);
	caller->egid = BPF_CORE_READ(task, cred, egid.val);
	inode = BPF_CORE_READ(task, mm, exe_file, f_inode);
	if (!inode) {
		caller->flags |= GPA_CALLER_NO_EXE;
		return;
	}
	caller->exe_ino = BPF_CORE_READ(inode, i_ino);
	caller->exe_dev = BPF_CORE_READ(inode, i_sb, s_dev);
}
#endif

/* Where a redirected connect goes: the agent's own live listener in the caller's netns. */
struct target {
	__u32 ip; /* network byte order */
	__u16 port; /* network byte order */
	__u16 endpoint;
};

enum verdict {
	PASS,     /* not ours: leave the connect alone */
	REDIRECT, /* rewrite to the target */
	REFUSE,   /* an intercepted endpoint and no agent to serve it: fail closed */
};

static __always_inline enum verdict intercept(struct bpf_sock_addr *ctx, __u32 ip, __u16 port,
					      __u32 is_v6, struct target *out)
{
	struct gpa_policy_key key = { .ip = ip, .port = port, ._pad = 0 };
	struct gpa_policy_value *policy;
	struct gpa_caller caller = {};
	struct gpa_config *cfg;
	struct bpf_sock *listener;
	__u64 pid_tgid, uid_gid, cookie, netns;
	__u32 zero = 0;

	if (ctx->type != SOCK_STREAM)
		return PASS;
	policy = bpf_map_lookup_elem(&gpa_policy, &key);
	if (!policy || is_agent(ctx))
		return PASS;

	netns = bpf_get_netns_cookie(ctx);
	listener = bpf_map_lookup_elem(&gpa_listeners, &netns);
	if (!listener)
		return REFUSE;
	if (listener->family != AF_INET || listener->state != TCP_LISTEN) {
		bpf_sk_release(listener);
		return REFUSE;
	}
	out->ip = listener->src_ip4;
	out->port = bpf_htons((__u16)listener->src_port);
	out->endpoint = policy->endpoint;
	bpf_sk_release(listener);

	cfg = bpf_map_lookup_elem(&gpa_config, &zero);
	pid_tgid = bpf_get_current_pid_tgid();
	uid_gid = bpf_get_current_uid_gid();
	caller.cgroup_id = bpf_get_current_cgroup_id();
	caller.netns_cookie = netns;
	caller.connect_boot_ns = bpf_ktime_get_boot_ns();
	caller.tgid = pid_tgid >> 32;
	caller.tid = (__u32)pid_tgid;
	caller.uid = (__u32)uid_gid;
	caller.gid = uid_gid >> 32;
	caller.generation = cfg ? cfg->generation : 0;
	caller.orig_ip = ip;
	caller.orig_port = port;
	caller.endpoint = policy->endpoint;
	caller.is_v6 = is_v6;
	bpf_get_current_comm(caller.comm, sizeof(caller.comm));
	caller.connect_task = bpf_get_current_task();
#ifdef GPA_TASK_BTF
	read_task(&caller);
#endif

	cookie = bpf_get_socket_cookie(ctx);
	/* Unrecordable: refuse rather than hand the agent a connection it cannot attribute. */
	if (bpf_map_update_elem(&gpa_pending, &cookie, &caller, BPF_ANY) != 0)
		return REFUSE;
	return REDIRECT;
}

SEC("cgroup/connect4")
int gpa_connect4(struct bpf_sock_addr *ctx)
{
	struct target t = {};

	switch (intercept(ctx, ctx->user_ip4, (__u16)ctx->user_port, 0, &t)) {
	case REDIRECT:
		ctx->user_ip4 = t.ip;
		ctx->user_port = t.port;
		return 1;
	case REFUSE:
		return 0; /* connect() fails with EPERM */
	default:
		return 1;
	}
}

SEC("cgroup/connect6")
int gpa_connect6(struct bpf_sock_addr *ctx)
{
	struct target t = {};

	/* Only the v4-mapped form ::ffff:a.b.c.d of an IPv4 endpoint. */
	if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 ||
	    ctx->user_ip6[2] != bpf_htonl(0x0000ffff))
		return 1;
	switch (intercept(ctx, ctx->user_ip6[3], (__u16)ctx->user_port, 1, &t)) {
	case REDIRECT:
		ctx->user_ip6[3] = t.ip;
		ctx->user_port = t.port;
		return 1;
	case REFUSE:
		return 0;
	default:
		return 1;
	}
}

static __always_inline void client_key(struct bpf_sock_ops *skops, struct gpa_audit_key *key)
{
	key->netns_cookie = bpf_get_netns_cookie(skops);
	key->src_ip = skops->local_ip4;
	key->src_port = (__u16)skops->local_port;
	key->_pad = 0;
}

SEC("sockops")
int gpa_sockops(struct bpf_sock_ops *skops)
{
	struct gpa_audit_key key = {};
	struct gpa_caller *caller;
	__u64 cookie;

	if (skops->op == BPF_SOCK_OPS_STATE_CB) {
		/* A watched client socket closed: its record, if the agent has not taken it, is
		 * removed, so no later connection from the same port can pick it up. */
		if (skops->args[1] == BPF_TCP_CLOSE) {
			client_key(skops, &key);
			bpf_map_delete_elem(&gpa_audit, &key);
		}
		return 1;
	}
	if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
		return 1;
	cookie = bpf_get_socket_cookie(skops);
	caller = bpf_map_lookup_elem(&gpa_pending, &cookie);
	if (!caller)
		return 1;
	/* A deferred SYN (TCP_FASTOPEN_CONNECT) leaves from the task that first writes, which may
	 * not be the one that connected: a fork sharing the socket writes once the connector has
	 * exec'd an allowed binary. The /proc fallback must not then lend that binary to the
	 * request, so a SYN from another task is marked. bpf_get_current_pid_tgid is refused here
	 * before Linux 6.x (Debian 12's 6.1), bpf_get_current_task is not; its value, a kernel
	 * address, is only compared and zeroed before the agent reads the record. */
	if (caller->connect_task != bpf_get_current_task())
		caller->flags |= GPA_CALLER_SYN_OTHER_TASK;
	caller->connect_task = 0;
	caller->syn_boot_ns = bpf_ktime_get_boot_ns();
	client_key(skops, &key);
	bpf_map_update_elem(&gpa_audit, &key, caller, BPF_ANY);
	bpf_map_delete_elem(&gpa_pending, &cookie);
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	return 1;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
