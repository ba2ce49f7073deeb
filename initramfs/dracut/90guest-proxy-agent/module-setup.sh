#!/bin/bash
# SPDX-License-Identifier: MIT
# dracut module: the agent in the initramfs, started at pre-udev (before any network), with
# the same hand-over as the initramfs-tools scripts (docs/EARLY-BOOT.md).

check() {
    [ -x /usr/sbin/guest-proxy-agent ] || return 1
    return 0
}

depends() {
    return 0
}

install() {
    inst_binary /usr/sbin/guest-proxy-agent
    [ -r /etc/guest-proxy-agent/config.json ] && inst_simple /etc/guest-proxy-agent/config.json
    inst_hook pre-udev 00 "$moddir/gpa-early.sh"
}
