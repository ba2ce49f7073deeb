# SPDX-License-Identifier: MIT
# Local qemu image (x86_64 and arm64) with guest-proxy-agent baked in: starts from a Debian
# cloud image, installs the .deb made by build/package, rebuilds the initramfs with the hook.
# Written for Packer 1.6 HCL2 (Debian's packer, qemu builder built in); current Packer needs
# the qemu plugin first: `packer plugins install github.com/hashicorp/qemu` (docs/IMAGES.md).
#
#   packer build -only='qemu.x86_64' -var source_image=debian-12-genericcloud-amd64.qcow2 \
#     -var source_checksum=sha512:... image-recipes/qemu
#
# The build VM gets its SSH user from cloud-init NoCloud served over Packer's HTTP server
# (image-recipes/qemu/http/), reaches nothing but that server (-netdev user,restrict=on)
# and runs under TCG unless `accelerator` is set to kvm.

variable "source_image" {
  type        = string
  description = "Path or URL of the Debian genericcloud qcow2 for the architecture built."
  default     = "debian-12-genericcloud-amd64.qcow2"
}

variable "source_checksum" {
  type        = string
  description = "Checksum of source_image (\"none\" only for a locally built file)."
  default     = "none"
}

variable "agent_debs" {
  type        = map(string)
  description = "The .deb built by build/package for each source (keyed by source name)."
  default = {
    x86_64  = "build/out/guest-proxy-agent_0.1.0_amd64.deb"
    aarch64 = "build/out/guest-proxy-agent_0.1.0_arm64.deb"
  }
}

variable "accelerator" {
  type    = string
  default = "tcg"
}

variable "output_directory" {
  type    = string
  default = "build/out/packer"
}

variable "ssh_password" {
  type        = string
  description = "Build-time password of the packer user (the user is removed at the end)."
  default     = "packer-build-only"
  sensitive   = true
}

source "qemu" "x86_64" {
  qemu_binary      = "qemu-system-x86_64"
  machine_type     = "q35"
  accelerator      = var.accelerator
  iso_url          = var.source_image
  iso_checksum     = var.source_checksum
  disk_image       = true
  use_backing_file = false
  disk_size        = "4G"
  format           = "qcow2"
  memory           = 1024
  headless         = true
  net_device       = "virtio-net"
  disk_interface   = "virtio"
  http_directory   = "image-recipes/qemu/http"
  qemuargs = [
    ["-smbios", "type=1,serial=ds=nocloud-net;s=http://{{ .HTTPIP }}:{{ .HTTPPort }}/"],
  ]
  ssh_username     = "packer"
  ssh_password     = var.ssh_password
  ssh_timeout      = "20m"
  shutdown_command = "sudo shutdown -P now"
  output_directory = "${var.output_directory}/x86_64"
  vm_name          = "debian-gpa-x86_64.qcow2"
}

source "qemu" "aarch64" {
  qemu_binary      = "qemu-system-aarch64"
  machine_type     = "virt"
  accelerator      = var.accelerator
  iso_url          = var.source_image
  iso_checksum     = var.source_checksum
  disk_image       = true
  use_backing_file = false
  disk_size        = "4G"
  format           = "qcow2"
  memory           = 1024
  headless         = true
  net_device       = "virtio-net"
  disk_interface   = "virtio"
  http_directory   = "image-recipes/qemu/http"
  qemuargs = [
    ["-cpu", "cortex-a57"],
    ["-bios", "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd"],
    ["-smbios", "type=1,serial=ds=nocloud-net;s=http://{{ .HTTPIP }}:{{ .HTTPPort }}/"],
  ]
  ssh_username     = "packer"
  ssh_password     = var.ssh_password
  ssh_timeout      = "30m"
  shutdown_command = "sudo shutdown -P now"
  output_directory = "${var.output_directory}/aarch64"
  vm_name          = "debian-gpa-aarch64.qcow2"
}

build {
  sources = ["source.qemu.x86_64", "source.qemu.aarch64"]

  provisioner "file" {
    source      = var.agent_debs[source.name]
    destination = "/tmp/guest-proxy-agent.deb"
  }

  provisioner "file" {
    source      = "image-recipes/scripts/install-agent.sh"
    destination = "/tmp/install-agent.sh"
  }

  provisioner "shell" {
    inline = [
      "sudo sh /tmp/install-agent.sh /tmp/guest-proxy-agent.deb",
      "rm -f /tmp/install-agent.sh",
      "sudo cloud-init clean --logs",
      "sudo userdel --remove packer || true",
    ]
  }
}
