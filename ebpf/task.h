/* SPDX-License-Identifier: GPL-2.0-only OR MIT */
/*
 * The few kernel structures the connect hooks read, declared by hand for CO-RE.
 *
 * Only the fields named here are read; `preserve_access_index` makes every access a BTF
 * relocation that the loader resolves against the running kernel's BTF
 * (/sys/kernel/btf/vmlinux), so field offsets are never baked in and no generated vmlinux.h is
 * needed. Names must match the kernel's; layout does not matter.
 */
#ifndef GPA_TASK_H
#define GPA_TASK_H

#include <linux/types.h>

typedef struct {
	__u32 val;
} kuid_t;

typedef struct {
	__u32 val;
} kgid_t;

struct super_block {
	__u32 s_dev; /* dev_t, kernel encoding */
} __attribute__((preserve_access_index));

struct inode {
	unsigned long i_ino;
	struct super_block *i_sb;
} __attribute__((preserve_access_index));

struct file {
	struct inode *f_inode;
} __attribute__((preserve_access_index));

struct mm_struct {
	struct file *exe_file;
} __attribute__((preserve_access_index));

struct cred {
	kuid_t euid;
	kgid_t egid;
} __attribute__((preserve_access_index));

struct task_struct {
	unsigned int ptrace;
	struct mm_struct *mm;
	struct task_struct *group_leader;
	__u64 start_boottime;
	const struct cred *cred;
} __attribute__((preserve_access_index));

#endif
