/* SPDX-License-Identifier: GPL-2.0-only OR MIT */
/*
 * Every struct the kernel programs and the agent exchange through maps.
 *
 * Read this first: the Rust mirror of these structs is agent/src/redirect/maps.rs. Both sides
 * must agree byte for byte, so every struct here has explicit padding fields and no implicit
 * holes; the Rust side asserts the sizes at compile time and a system test checks them against
 * the loaded object's BTF.
 */
#ifndef GPA_MAPS_H
#define GPA_MAPS_H

#include <linux/types.h>

#define GPA_COMM_LEN 16

/* Which metadata endpoint a redirected connection was headed for. */
enum gpa_endpoint {
	GPA_ENDPOINT_NONE = 0,
	GPA_ENDPOINT_IMDS = 1,
	GPA_ENDPOINT_WIRESERVER = 2,
	GPA_ENDPOINT_HOSTGAPLUGIN = 3,
};

/* policy map key: a destination to intercept. ip and port in network byte order. */
struct gpa_policy_key {
	__u32 ip;
	__u16 port;
	__u16 _pad;
};

/* policy map value: where to send it instead (network byte order) and which endpoint it is. */
struct gpa_policy_value {
	__u32 proxy_ip;
	__u16 proxy_port;
	__u16 endpoint;
};

/* Who connected, captured in the kernel at connect() time. */
struct gpa_caller {
	__u64 cgroup_id;
	__u64 netns_cookie;
	__u64 connect_boot_ns; /* bpf_ktime_get_boot_ns(): lets the agent detect pid reuse */
	__u32 tgid;
	__u32 tid;
	__u32 uid; /* real uid: low 32 bits of bpf_get_current_uid_gid() */
	__u32 gid; /* real gid: high 32 bits */
	__u32 orig_ip;   /* network byte order */
	__u16 orig_port; /* network byte order */
	__u16 endpoint;  /* enum gpa_endpoint */
	__u32 is_v6;     /* 1 when the caller used an AF_INET6 socket (v4-mapped destination) */
	__u32 _pad;
	char comm[GPA_COMM_LEN];
};

/* audit map key: the client's side of the redirected connection as the proxy sees its peer. */
struct gpa_audit_key {
	__u64 netns_cookie;
	__u32 src_ip;   /* network byte order */
	__u16 src_port; /* host byte order, as sock_ops local_port gives it */
	__u16 _pad;
};

/* config map (one slot): how the agent marks its own sockets so they are never redirected. */
struct gpa_config {
	__u32 agent_mark;
	__u32 _pad;
};

#endif
