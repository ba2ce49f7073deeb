# SPDX-License-Identifier: MIT
# Azure managed image (x86_64 and arm64) with guest-proxy-agent baked in, for image builders
# who publish to Azure: starts from the Debian 12 marketplace image, installs the .deb made by
# build/package, rebuilds the initramfs with the hook, deprovisions. Written for Packer 1.6
# HCL2; current Packer needs the plugin first: `packer plugins install
# github.com/hashicorp/azure` (docs/IMAGES.md).
#
#   packer build -only='azure-arm.x86_64' -var subscription_id=... -var resource_group=... \
#     image-recipes/azure
#
# Authentication: `az login` on the build machine (use_azure_cli_auth), or set client_id /
# client_secret / tenant_id for a service principal.

variable "subscription_id" {
  type    = string
  default = "00000000-0000-0000-0000-000000000000"
}

variable "tenant_id" {
  type    = string
  default = ""
}

variable "client_id" {
  type    = string
  default = ""
}

variable "client_secret" {
  type      = string
  default   = ""
  sensitive = true
}

variable "use_azure_cli_auth" {
  type    = bool
  default = true
}

variable "resource_group" {
  type        = string
  description = "Existing resource group that receives the managed images."
  default     = "guest-proxy-agent-images"
}

variable "location" {
  type    = string
  default = "eastus"
}

variable "agent_debs" {
  type        = map(string)
  description = "The .deb built by build/package for each source (keyed by source name)."
  default = {
    x86_64 = "build/out/guest-proxy-agent_0.1.0_amd64.deb"
    arm64  = "build/out/guest-proxy-agent_0.1.0_arm64.deb"
  }
}

variable "image_version" {
  type    = string
  default = "0.1.0"
}

source "azure-arm" "x86_64" {
  subscription_id                   = var.subscription_id
  tenant_id                         = var.tenant_id
  client_id                         = var.client_id
  client_secret                     = var.client_secret
  use_azure_cli_auth                = var.use_azure_cli_auth
  os_type                           = "Linux"
  image_publisher                   = "Debian"
  image_offer                       = "debian-12"
  image_sku                         = "12-gen2"
  location                          = var.location
  vm_size                           = "Standard_D2s_v5"
  managed_image_resource_group_name = var.resource_group
  managed_image_name                = "debian-12-gpa-x86_64-${var.image_version}"
  azure_tags = {
    guest_proxy_agent = var.image_version
    arch              = "x86_64"
  }
}

source "azure-arm" "arm64" {
  subscription_id                   = var.subscription_id
  tenant_id                         = var.tenant_id
  client_id                         = var.client_id
  client_secret                     = var.client_secret
  use_azure_cli_auth                = var.use_azure_cli_auth
  os_type                           = "Linux"
  image_publisher                   = "Debian"
  image_offer                       = "debian-12"
  image_sku                         = "12-arm64"
  location                          = var.location
  vm_size                           = "Standard_D2ps_v5"
  managed_image_resource_group_name = var.resource_group
  managed_image_name                = "debian-12-gpa-arm64-${var.image_version}"
  azure_tags = {
    guest_proxy_agent = var.image_version
    arch              = "arm64"
  }
}

build {
  sources = ["source.azure-arm.x86_64", "source.azure-arm.arm64"]

  provisioner "file" {
    source      = var.agent_debs[source.name]
    destination = "/tmp/guest-proxy-agent.deb"
  }

  provisioner "file" {
    source      = "image-recipes/scripts/install-agent.sh"
    destination = "/tmp/install-agent.sh"
  }

  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; {{ .Vars }} sudo -E sh '{{ .Path }}'"
    inline = [
      "sh /tmp/install-agent.sh /tmp/guest-proxy-agent.deb",
      "rm -f /tmp/install-agent.sh",
      # Azure's generalisation step; must stay last.
      "/usr/sbin/waagent -force -deprovision+user && export HISTSIZE=0 && sync",
    ]
    inline_shebang = "/bin/sh -x"
  }
}
