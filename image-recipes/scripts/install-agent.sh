#!/bin/sh
# SPDX-License-Identifier: MIT
# Provisioner shared by every recipe: install the uploaded .deb (static binary: no
# dependencies), make sure the unit is enabled, and rebuild the initramfs so the agent starts
# from it on the next boot (the package's hook; GPA_INITRAMFS=no in
# /etc/default/guest-proxy-agent leaves it out).
set -eu
deb=${1:-/tmp/guest-proxy-agent.deb}
export DEBIAN_FRONTEND=noninteractive
dpkg -i "$deb"
rm -f "$deb"
systemctl enable guest-proxy-agent.service
if command -v update-initramfs >/dev/null 2>&1; then
  update-initramfs -u -k all
elif command -v dracut >/dev/null 2>&1; then
  dracut --force --regenerate-all
fi
# cloud-init's provisioning check calls the reference agent's name.
/usr/sbin/azure-proxy-agent --version
