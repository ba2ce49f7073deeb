#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Prints a realistic IMDS /metadata/instance answer of about 1 KiB (the upstream's file)."""
import json

DOC = {
    "compute": {
        "azEnvironment": "AzurePublicCloud", "location": "westeurope", "name": "bench-vm",
        "osType": "Linux", "publisher": "Debian", "offer": "debian-12", "sku": "12-gen2",
        "version": "0.20240211.1654", "resourceGroupName": "bench-rg",
        "subscriptionId": "00000000-0000-0000-0000-000000000000",
        "vmId": "11111111-2222-3333-4444-555555555555", "vmSize": "Standard_D2s_v5", "zone": "1",
        "tags": "env:bench", "provider": "Microsoft.Compute", "priority": "Regular",
    },
    "network": {"interface": [{
        "ipv4": {"ipAddress": [{"privateIpAddress": "10.0.0.4", "publicIpAddress": ""}],
                 "subnet": [{"address": "10.0.0.0", "prefix": "24"}]},
        "ipv6": {"ipAddress": []}, "macAddress": "000D3A000000"}]},
}

text = json.dumps(DOC, indent=2)
# Pad with trailing spaces (still valid JSON) to exactly 1024 bytes with the newline.
print(text + " " * max(0, 1023 - len(text)))
