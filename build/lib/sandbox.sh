# SPDX-License-Identifier: MIT
# The sandbox the build scripts run the agent and the fake host in (build/demo, build/bench,
# build/boot.d/cloud-init-provision): a network namespace with the metadata addresses on its
# lo, and optionally a child cgroup to attach the agent to. The metadata addresses only ever
# go inside a namespace made here, never into the root namespace, and the agent only ever
# attaches to a cgroup made here, never to the root cgroup; one copy so every script makes and
# removes them the same way, also on failure. Sourced (from the repository root), not run.
#
#   sandbox_create [--cgroup] TAG [ADDR/PREFIX...]
#       Makes the namespace TAG: lo up, 169.254.169.254/32, 168.63.129.16/32 and the extra
#       addresses on it; with --cgroup, also the child cgroup <cgroup2 mount>/TAG. Sets
#       SANDBOX_NS, SANDBOX_CG (empty without --cgroup), and the command prefixes SANDBOX_IN_NS
#       (run in the namespace) and SANDBOX_IN_CG (in the namespace and the cgroup).
#   sandbox_cleanup
#       Ends by pid whatever is still in the cgroup, removes the cgroup and the namespace (only
#       what sandbox_create made). Never fails, so it can end an EXIT trap under `set -e`. End
#       the processes the script started itself first: it knows their pids.
#
# Background processes: start them through the prefixes ("${SANDBOX_IN_NS[@]}" cmd &; nsenter
# and sh both exec, so $! is cmd's own pid) or with `ip netns exec` directly, never through a
# shell function: a backgrounded function is a subshell, and its $! is not the process.

SANDBOX_NS=""
SANDBOX_CG=""
SANDBOX_IN_NS=()
SANDBOX_IN_CG=()

sandbox_create() {
  local want_cg=0 tag cg_root="" a
  if [ "${1:-}" = --cgroup ]; then want_cg=1; shift; fi
  tag=${1:?sandbox_create: TAG missing}
  shift
  if [ "$want_cg" = 1 ]; then
    cg_root="$(awk '$9=="cgroup2"{print $5; exit}' /proc/self/mountinfo)"
    [ -n "$cg_root" ] || { echo "sandbox: no cgroup v2 mount" >&2; return 1; }
  fi
  ip netns add "$tag" || return 1
  # Recorded only once made: cleanup never removes a namespace of the same name it did not make.
  SANDBOX_NS=$tag
  ip -n "$tag" link set lo up || return 1
  for a in 169.254.169.254/32 168.63.129.16/32 "$@"; do ip -n "$tag" addr add "$a" dev lo || return 1; done
  SANDBOX_IN_NS=(nsenter --net="/run/netns/$tag" --)
  if [ "$want_cg" = 1 ]; then
    mkdir "$cg_root/$tag" || return 1
    SANDBOX_CG="$cg_root/$tag"
    # exit 99: a caller that could not join the cgroup must not run unprotected.
    SANDBOX_IN_CG=("${SANDBOX_IN_NS[@]}" sh -c "echo \$\$ > $SANDBOX_CG/cgroup.procs || exit 99; exec \"\$@\"" sh)
  fi
}

sandbox_cleanup() {
  local p i
  if [ -n "$SANDBOX_CG" ] && [ -d "$SANDBOX_CG" ]; then
    for p in $(cat "$SANDBOX_CG/cgroup.procs" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    # A killed process leaves the cgroup a moment after the signal.
    for i in $(seq 50); do rmdir "$SANDBOX_CG" 2>/dev/null && break; sleep 0.1; done
  fi
  { [ -n "$SANDBOX_NS" ] && ip netns del "$SANDBOX_NS" 2>/dev/null; } || true
  SANDBOX_CG=""
  SANDBOX_NS=""
  return 0
}
