#!/usr/bin/env bash
# Checks the service as shipped (run by CI, as root, on Debian or Ubuntu):
#  1. the unit's hardening: `systemd-analyze security --offline=true` exposure at most 3.0;
#  2. the amd64 package installs with dpkg -i: user, enabled-not-started unit, conffile, model;
#  3. the unit verifies against the installed binary (`systemd-analyze verify`);
#  4. the service's command starts with the example config as the service user in the state
#     directory systemd would create, reports ready, and drains on SIGTERM with status 0;
#  5. the package purges cleanly.
# systemd is not PID 1 here, so (4) runs the unit's ExecStart as its user rather than through
# systemctl; docs/deploy.md lists the checks to do on a booted device.
set -euo pipefail
cd "$(dirname "$0")/.."
MAX_EXPOSURE=3.0
unit=systemd/plaster-agent.service

command -v systemd-analyze >/dev/null || { apt-get update -qq && apt-get install -y -qq systemd >/dev/null; }

exposure=$(systemd-analyze security --offline=true "$unit" 2>/dev/null |
    sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
echo "exposure of $unit: $exposure (limit $MAX_EXPOSURE)"
awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e != "" && e <= m) }' ||
    { echo "FAIL: exposure $exposure above $MAX_EXPOSURE"; exit 1; }

deb=$(ls target/debian/plaster-agent_*_amd64.deb)
dpkg -i "$deb"
trap 'dpkg --purge plaster-agent >/dev/null 2>&1 || true' EXIT
systemd-analyze verify /usr/lib/systemd/system/plaster-agent.service
id plaster-agent
id -nG plaster-agent | grep -qw video || { echo "FAIL: plaster-agent is not in group video"; exit 1; }
[ -L /etc/systemd/system/multi-user.target.wants/plaster-agent.service ] ||
    { echo "FAIL: the package did not enable the unit"; exit 1; }
grep -qx /etc/plaster-agent/agent.toml /var/lib/dpkg/info/plaster-agent.conffiles ||
    { echo "FAIL: agent.toml is not a conffile"; exit 1; }
/usr/bin/plaster-agent check-config --config /etc/plaster-agent/agent.toml

# What StateDirectory= creates, then the unit's ExecStart as its user.
install -d -o plaster-agent -g plaster-agent -m 0750 /var/lib/plaster-agent
log=$(mktemp)
setpriv --reuid=plaster-agent --regid=plaster-agent --init-groups \
    env RUST_LOG=warn,plaster_agent=info \
    /usr/bin/plaster-agent run --config /etc/plaster-agent/agent.toml 2>"$log" &
agent=$!
for _ in $(seq 1 300); do
    grep -q "running: device" "$log" && break
    kill -0 "$agent" 2>/dev/null || break
    sleep 0.1
done
grep -q "running: device" "$log" || { cat "$log"; echo "FAIL: the service did not start"; exit 1; }
kill -TERM "$agent"
wait "$agent" || { cat "$log"; echo "FAIL: the service did not stop cleanly"; exit 1; }
[ "$(stat -c %U /var/lib/plaster-agent/spool)" = plaster-agent ] ||
    { echo "FAIL: the state directory was not written as plaster-agent"; exit 1; }
echo "service started as plaster-agent with the example config and drained on SIGTERM"
dpkg --purge plaster-agent
trap - EXIT
[ ! -e /var/lib/plaster-agent ] || { echo "FAIL: purge left /var/lib/plaster-agent"; exit 1; }
userdel plaster-agent 2>/dev/null || true
groupdel plaster-agent 2>/dev/null || true
echo "package checks passed"
