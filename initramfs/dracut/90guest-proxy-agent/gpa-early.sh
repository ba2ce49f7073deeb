#!/bin/sh
# SPDX-License-Identifier: MIT
# dracut pre-udev hook: start the agent before any network (see module-setup.sh); `--early`
# offers its listener to the unit's agent (docs/EARLY-BOOT.md).
type getargbool >/dev/null 2>&1 || . /lib/dracut-lib.sh
getargbool 1 gpa.early || return 0
[ -x /usr/sbin/guest-proxy-agent ] || return 0

early=/run/guest-proxy-agent-early
mkdir -p "$early/state" "$early/log" /var/lib/guest-proxy-agent /var/log/guest-proxy-agent
chmod 0700 "$early" "$early/state" "$early/log"
mount -o bind "$early/state" /var/lib/guest-proxy-agent
mount -o bind "$early/log" /var/log/guest-proxy-agent
mkdir -p /sys/fs/bpf
grep -q ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf

/usr/sbin/guest-proxy-agent --early >"$early/agent.log" 2>&1 &
echo $! >"$early/pid"
