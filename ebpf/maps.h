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

/* policy map value: which endpoint it is. Where the connect goes instead is not here: it is
 * the agent's own listening socket, found in gpa_listeners (see the kernel program). */
struct gpa_policy_value {
	__u16 endpoint;
	__u16 _pad;
	__u32 _pad2;
};

/* gpa_caller.flags */
#define GPA_CALLER_TASK_READ (1u << 0)  /* exe_dev, exe_ino, start_boot_ns, euid, egid are the kernel's */
#define GPA_CALLER_TRACED (1u << 1)     /* the connecting task was being ptraced at connect time */
#define GPA_CALLER_NO_EXE (1u << 2)     /* the task had no executable (kernel thread, exiting mm) */
#define GPA_CALLER_SYN_OTHER_TASK (1u << 3) /* the SYN was sent by another task than the connect */

/*
 * Who connected, captured in the kernel at connect() time: nothing here can be changed by the
 * caller afterwards (an execve, a setresuid, a new thread name). The executable is identified by
 * the device and inode of mm->exe_file, not by a name.
 */
struct gpa_caller {
	__u64 cgroup_id;
	__u64 netns_cookie;
	__u64 connect_boot_ns; /* bpf_ktime_get_boot_ns() at connect */
	__u64 syn_boot_ns;     /* bpf_ktime_get_boot_ns() when the SYN left (sockops); 0 before */
	__u64 start_boot_ns;   /* the thread group leader's start_boottime (pid reuse) */
	__u64 exe_ino;         /* mm->exe_file->f_inode->i_ino */
	__u32 exe_dev;         /* ...->i_sb->s_dev, kernel encoding (major << 20 | minor) */
	__u32 tgid;
	__u32 tid;
	__u32 uid; /* real uid: low 32 bits of bpf_get_current_uid_gid() */
	__u32 gid; /* real gid: high 32 bits */
	__u32 euid;
	__u32 egid;
	__u32 generation; /* gpa_config.generation when recorded: records of another agent are refused */
	__u32 flags;      /* GPA_CALLER_* */
	__u32 orig_ip;    /* network byte order */
	__u16 orig_port;  /* network byte order */
	__u16 endpoint;   /* enum gpa_endpoint */
	__u32 is_v6;      /* 1 when the caller used an AF_INET6 socket (v4-mapped destination) */
	char comm[GPA_COMM_LEN];
	__u64 connect_task; /* bpf_get_current_task() at connect, compared at the SYN, then zeroed */
};

/* audit map key: the client's side of the redirected connection as the proxy sees its peer. */
struct gpa_audit_key {
	__u64 netns_cookie;
	__u32 src_ip;   /* network byte order */
	__u16 src_port; /* host byte order, as sock_ops local_port gives it */
	__u16 _pad;
};

/* config map (one slot). */
struct gpa_config {
	__u32 agent_mark; /* SO_MARK of the agent's own sockets: never redirected */
	__u32 generation; /* stamped into every record; a new agent picks a new one */
};

#endif
