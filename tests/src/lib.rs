// SPDX-License-Identifier: MIT
//! Privileged system tests and the fake MSP host.
